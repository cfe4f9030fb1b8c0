"""Protocols as data: the built-in LFR and landmark budgets, user YAML files, validation errors."""

import pytest

from visrec.errors import ConfigError
from visrec.protocols import BUILTIN, load_protocol


def test_builtin_protocols():
    assert {"deepglint-light", "deepglint-large", "iqiyi-light", "iqiyi-large", "icpr20-landmarks",
            "icme21-landmarks"} <= set(BUILTIN)
    light = load_protocol("deepglint-light")
    assert (light.max_gflops, light.max_size_mb, light.size_strict) == (1.0, 20.0, True)  # "< 20 MB" strict
    assert light.dtype == "float32" and light.embedding_dim == 512 and light.targets == (1e-8,)
    assert load_protocol("iqiyi-large").max_gflops == 30 and load_protocol("iqiyi-large").targets == (1e-4,)
    icme = BUILTIN["icme21-landmarks"]
    assert icme.max_gflops == 0.1 and icme.max_size_mb == 2 and not icme.size_strict
    assert BUILTIN["icpr20-landmarks"].max_gflops == 1.0 and BUILTIN["icpr20-landmarks"].max_size_mb == 20


def test_user_protocol_from_yaml(tmp_path):
    user = load_protocol("configs/protocols/example.yaml")
    assert user.max_gflops == 0.25 and user.max_size_mb == 5 and user.embedding_dim == 512
    f = tmp_path / "mine.yml"
    f.write_text("name: mine\nmax_gflops: 2\n")
    assert load_protocol(f).max_gflops == 2 and load_protocol(str(f)).max_size_mb is None


@pytest.mark.parametrize("text, field", [
    ("name: x\nmax_gflops: -1\n", "max_gflops"),
    ("name: x\nmax_size_mb: lots\n", "max_size_mb"),
    ("name: x\nembeding_dim: 512\n", "embeding_dim"),   # a typo is an error, not silently ignored
    ("max_gflops: 1\n", "name"),
    ("name: x\ndtype: float16\n", "dtype"),
    ("name: x\nmax_gflops: 1\nmax_gflops: 30\n", "max_gflops. appears twice"),  # not silently the last
])
def test_invalid_yaml_names_the_field(tmp_path, text, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml.*{field}"):
        load_protocol(bad)


def test_unknown_name_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown protocol 'nope'.*deepglint-light"):
        load_protocol("nope")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_protocol(broken)
