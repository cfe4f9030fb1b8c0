"""Where visrec.data.fixtures finds its Debian mirror: the machine's own apt sources, never a built-in host.

Offline: every apt sources file here is a tmp file; nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import visrec.data.fixtures as fx
from visrec.errors import VisrecError

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
ARCHIVE = "dlib_19.24%2Bdfsg.orig.tar.bz2"


def _sources(tmp_path: Path, main: str | None = None, **parts: str) -> tuple[Path, Path]:
    """(sources.list, sources.list.d) under tmp_path; ``parts``: file name (``_`` for ``.``) -> text."""
    lst, d = tmp_path / "sources.list", tmp_path / "sources.list.d"
    d.mkdir()
    if main is not None:
        lst.write_text(main)
    for name, text in parts.items():
        (d / name.replace("_", ".")).write_text(text)
    return lst, d


def test_one_line_list_with_options_and_comments(tmp_path):
    paths = _sources(tmp_path, main=f"""\
# deb http://commented.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main contrib
deb [arch=amd64 signed-by={KEYRING}] http://mirror.example/debian/ bookworm-updates main
deb [ arch=amd64  signed-by={KEYRING} ] http://mirror.example/debian/ bookworm main contrib  # the archive
deb http://mirror.example/debian bookworm main
""")
    m = fx.debian_mirror(paths)
    assert (m.uri, m.suite, m.signed_by) == ("http://mirror.example/debian/", "bookworm", KEYRING)
    assert m.origin == f"{paths[0]}:4"
    assert fx.deb_src_line(m) == f"deb-src [signed-by={KEYRING}] http://mirror.example/debian bookworm main\n"
    assert fx.pool_uri(m) == f"http://mirror.example/debian/pool/main/d/dlib/{ARCHIVE}"


def test_deb822_several_uris_and_suites(tmp_path):
    # the security stanza comes first in name order and must not be taken; nor the -updates suite that is
    # listed first in the main stanza; a disabled stanza and commented fields are skipped
    paths = _sources(tmp_path, **{
        "a-security_sources": f"""\
Types: deb
URIs: https://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: {KEYRING}
""",
        "b-disabled_sources": """\
Enabled: no
Types: deb
URIs: https://disabled.example/debian
Suites: bookworm
Components: main
""",
        "debian_sources": f"""\
# Types: deb
# URIs: https://commented.example/debian

Types: deb deb-src
# a comment inside the stanza
URIs: https://user:secret@proxy.example:3142/debian https://second.example/debian
Suites: bookworm-updates bookworm
Components: main contrib non-free-firmware
Signed-By: {KEYRING}
""",
        "other_list": "deb https://vendor.example/apt nodistro main\n",
        "ignored_list_disabled": "deb http://not-read.example/debian bookworm main\n",
    })
    m = fx.debian_mirror(paths)
    assert (m.type, m.uri, m.suite) == ("deb", "https://user:secret@proxy.example:3142/debian", "bookworm")
    assert fx.deb_src_line(m) == (f"deb-src [signed-by={KEYRING}] https://user:secret@proxy.example:3142/debian "
                                  "bookworm main\n")
    assert fx.pool_uri(m) == f"https://user:secret@proxy.example:3142/debian/pool/main/d/dlib/{ARCHIVE}"
    assert fx._redact(m.uri) == "https://proxy.example:3142/debian"
    entries = fx.read_apt_sources(paths)
    assert not any("not-read" in e.uri or "commented" in e.uri for e in entries)
    assert sum(e.main_archive for e in entries) == 4  # deb/deb-src x 2 URIs, suite bookworm only


def test_sources_list_before_parts_and_no_signed_by(tmp_path):
    paths = _sources(tmp_path, main="deb\tftp://first.example/debian  stable main\n",
                     debian_sources="Types: deb\nURIs: http://later.example/debian\nSuites: bookworm\n"
                                    "Components: main\n")
    m = fx.debian_mirror(paths)
    assert (m.uri, m.suite) == ("ftp://first.example/debian", "stable")
    assert fx.deb_src_line(m) == "deb-src ftp://first.example/debian stable main\n"


def test_inline_signed_by_key_is_kept_multiline(tmp_path):
    paths = _sources(tmp_path, debian_sources="""\
Types: deb
URIs: http://mirror.example/debian
Suites: trixie
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----
""")
    m = fx.debian_mirror(paths)
    assert m.signed_by.splitlines() == ["-----BEGIN PGP PUBLIC KEY BLOCK-----", "", "abc",
                                        "-----END PGP PUBLIC KEY BLOCK-----"]
    # the key goes to a file in the private apt directory; the line then names that file
    assert fx.deb_src_line(m, "/tmp/k.asc") == ("deb-src [signed-by=/tmp/k.asc] http://mirror.example/debian "
                                                "trixie main\n")
    assert fx.deb_src_line(m) == "deb-src http://mirror.example/debian trixie main\n"


@pytest.mark.parametrize("text", [
    "",
    "# deb http://mirror.example/debian bookworm main\n",
    "deb http://mirror.example/debian-security bookworm-security main\n"
    "deb http://mirror.example/debian bookworm-updates main\n"
    "deb http://mirror.example/debian bookworm-backports main\n"
    "deb http://security.example/ bookworm/updates main\n",
    "deb http://mirror.example/debian bookworm contrib\n",  # no main component
    "deb cdrom:[Debian 12]/ bookworm main\n",
    "deb http://archive.example/ubuntu jammy main\n",
])
def test_no_mirror_configured_says_what_to_configure(tmp_path, text):
    paths = _sources(tmp_path, main=text)
    with pytest.raises(VisrecError) as info:
        fx.debian_mirror(paths)
    msg = str(info.value)
    assert "no Debian archive mirror is configured in the apt sources" in msg
    assert str(paths[0]) in msg and f"{paths[1]}/*.sources" in msg
    assert "<mirror URI> bookworm main" in msg and "URIs:" in msg
    assert "://" not in msg.split("entries found:")[0]  # names no host of its own


def test_missing_sources_files_and_fetch_fails_before_downloading(tmp_path, monkeypatch):
    nowhere = (tmp_path / "no-sources.list", tmp_path / "no-sources.list.d")
    assert fx.read_apt_sources(nowhere) == []

    def boom(*a, **k):
        raise AssertionError("must not download without a mirror")

    monkeypatch.setattr(fx, "_pip_download", boom)
    monkeypatch.setattr(fx.urllib.request, "urlopen", boom)
    with pytest.raises(VisrecError, match="entries found: none.*add your Debian mirror"):
        fx.fetch_real_fixtures(tmp_path / "dest", apt_sources=nowhere)


def test_pip_index_is_read_from_config_and_redacted(monkeypatch):
    class Res:
        stdout = ("global.index-url='https://a:b@global.example/simple'\n"
                  "global.extra-index-url='file:///opt/extra/simple'\n"
                  ":env:.index-url='https://env.example/simple'\n"
                  "global.find-links='/opt/wheels'\n")

    monkeypatch.setattr(fx.subprocess, "run", lambda *a, **k: Res())
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    assert fx.pip_index() == "https://env.example/simple (extra: file:///opt/extra/simple)"
    Res.stdout = "global.index-url='https://a:b@global.example/simple'\n"
    assert fx.pip_index() == "https://global.example/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://u:p@index.example/simple")
    assert fx.pip_index() == "https://index.example/simple"
    Res.stdout = ""
    monkeypatch.delenv("PIP_INDEX_URL")
    assert fx.pip_index() == "pip's default index"


def test_fixtures_module_names_no_host():
    src = Path(fx.__file__).read_text()
    for pat in (r"debian\.org", r"pypi\.org", r"pythonhosted", r"://[A-Za-z]"):
        hits = [line for line in src.splitlines() if re.search(pat, line, re.I)]
        assert not hits, f"fixtures.py names a host ({pat}): {hits}"
    assert "DEB_SRC" not in src and '"uri":' not in src
