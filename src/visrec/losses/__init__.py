"""Margin losses, PartialFC, distillation and landmark losses, built by name."""

from __future__ import annotations

from visrec.registry import Registry

MARGIN_LOSSES: Registry = Registry("margin loss")


def build_margin_loss(name: str, **kwargs):
    return MARGIN_LOSSES.build(name, **kwargs)


def margin_option_problem(name: str, options: dict) -> tuple[str, str] | None:
    """(option, what is wrong) for the first option of margin loss ``name`` outside the range its class
    declares in ``OPTION_RANGES`` ({option: (low, high, low excluded)}; a range's bounds are included
    unless said), else None. Each such option must be a real number: YAML 1.1 reads ``1e30``, ``5e-1`` and
    ``nan`` as text, which would fail mid-step. Options a loss declares no range for (a plugin's) are left
    to its constructor."""
    import math

    ranges = getattr(MARGIN_LOSSES.get(name), "OPTION_RANGES", {})
    for key, value in options.items():
        if key not in ranges:
            continue
        low, high, open_low = ranges[key]
        interval = f"{'above' if open_low else 'from'} {low:g} {'and at most' if open_low else 'to'} {high:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads 1e30 or 5e-1 without a '.' as text: write 1.0e+30, 0.5)" if isinstance(value, str) \
                else ""
            return key, f"must be a number {interval}, got {value!r}"[:200] + hint
        if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
            return key, f"must be a number {interval}, got {value!r}"
    return None


# One import line per loss file: importing runs its @MARGIN_LOSSES.register decorator.

from visrec.losses import margins  # noqa: E402,F401
