"""``budget fit``: the largest member of a scalable family inside a protocol's budget — a grid search over the
family's knobs, each grid point counted and judged by the search's own budget code (:func:`model_cost` on the
meta device, :func:`over_budget`), so a family member and a searched candidate are held to one rule.

The grid is walked one line per combination of the knobs but the last; along a line the last knob is scanned
smallest first and the walk stops at the first point over budget (members grow along it). The largest passing
point of all lines wins; it and the next larger point of its line get the full check
(:func:`visrec.budget.check`: the fp32 ONNX file's size where the protocol limits size, which the 4-bytes-per-
parameter estimate can miss either way — by the file's overhead, and by the BatchNorm weights that folding
removes). The full check decides: the winner steps down its line while it fails, and up it while the next
larger point passes, so the fit passes the full check and the next larger point (when there is one) fails
it; only the points walked over are exported. A point
with more parameters than visrec builds (:data:`visrec.budget.MAX_BUILD_PARAMS`) counts as over budget, so a
protocol without a size limit fits the largest member that can be built, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from visrec.budget import MAX_BUILD_PARAMS, BudgetReport, check, check_buildable, registry_contract
from visrec.errors import VisrecError
from visrec.models import build_backbone
from visrec.protocols import Protocol, load_protocol
from visrec.search.space import model_cost, over_budget

# family -> (registry name, {knob: candidate values}); every knob keeps the 112x112 input. The last knob
# is scanned smallest first on one line per combination of the others.
_IRESNET_WIDTHS = [0.125, 0.1875] + [round(0.25 + 0.125 * i, 3) for i in range(30)]
_WIDTHS = [round(0.125 + 0.0625 * i, 4) for i in range(31)]  # 0.125 ... 2.0
FAMILIES: dict[str, tuple[str, dict[str, list]]] = {
    "effnet_face": ("effnet_face", {"depth_mult": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0],
                                    "width_mult": [round(0.5 + 0.1 * i, 2) for i in range(36)]}),
    # MobileFaceNet's width knob is its `scale` (channel multiplier of the arcface_torch design)
    "mobilefacenet": ("mobilefacenet", {"scale": [1, 2, 3, 4, 5, 6, 7, 8]}),
    **{f"iresnet{d}": (f"iresnet{d}", {"width": _IRESNET_WIDTHS}) for d in (18, 34, 50, 100)},
    # landmark models: width multipliers (106 points, the 112x112 landmark crop)
    "pfld": ("pfld", {"width_mult": _WIDTHS}),
    "heatmap_lite": ("heatmap_lite", {"width_mult": _WIDTHS}),
}


@dataclass
class FitResult:
    family: str
    protocol: Protocol
    best_kwargs: dict
    best: BudgetReport
    next_larger_kwargs: dict | None
    next_larger: BudgetReport | None
    tried: int
    next_larger_why: str | None = None  # why the next larger point has no report (too large to build)


def fit_to_budget(family: str, protocol: str | Protocol, knobs: dict[str, list] | None = None) -> FitResult:
    """The largest member (by LFR FLOPs) of a scalable family that passes every limit of the protocol, and the
    next larger candidate on the same grid line, which fails (module docstring). ``knobs`` replaces the
    family's grid, e.g. ``{"width_mult": [0.5, 0.75, 1.0]}``."""
    p = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    if family not in FAMILIES:
        raise VisrecError(f"unknown family {family!r}; scalable families: {', '.join(FAMILIES)}")
    name, default_knobs = FAMILIES[family]
    knobs = dict(knobs or default_knobs)
    smallest: list = []  # the first grid point and its cost, for the "nothing fits" message

    def fits(kw) -> tuple[bool, int]:
        cost = model_cost(name, kw, p.input_size)
        if not smallest:
            smallest.extend([kw, cost])
        return over_budget(cost, p.max_gflops, p.max_size_mb) is None and cost.params <= MAX_BUILD_PARAMS, cost.flops

    lines = [dict()]
    for key, values in list(knobs.items())[:-1]:  # e.g. one grid line per depth multiplier
        lines = [dict(line, **{key: v}) for line in lines for v in values]
    inner_key, inner_values = list(knobs.items())[-1]
    best, best_flops, neighbour, tried = None, -1, None, 0
    for line in lines:
        last_ok = None
        for v in inner_values:
            kw = dict(line, **{inner_key: v})
            ok, flops = fits(kw)
            tried += 1
            if not ok:
                if last_ok is not None and last_ok[1] > best_flops:
                    best, best_flops, neighbour = last_ok[0], last_ok[1], kw
                break
            last_ok = (kw, flops)
        else:
            if last_ok is not None and last_ok[1] > best_flops:
                best, best_flops, neighbour = last_ok[0], last_ok[1], None
    if best is None:
        kw, cost = smallest
        raise VisrecError(f"no member of {family} fits {p.name}: the smallest candidate {kw} has "
                          f"{cost.gflops:.4f} GFLOPs (LFR rule) and {cost.params:,} parameters "
                          f"(~{cost.mb:.2f} MB at fp32)")
    with_size = p.max_size_mb is not None

    def full_check(kw: dict) -> BudgetReport:
        check_buildable(name, kw, f"{family} {kw} (the fit to {p.name})")  # counted before it is built
        model = build_backbone(name, **kw)
        return check(model, p, with_size=with_size, contract=registry_contract(model, name, kw), untrained=True)

    def after(kw: dict):
        """The next point of ``kw``'s grid line, or None at its end."""
        k = inner_values.index(kw[inner_key])
        return dict(kw, **{inner_key: inner_values[k + 1]}) if k + 1 < len(inner_values) else None

    # the screen (4 bytes a parameter, BatchNorm unfolded) can be wrong either way by the file's overhead and
    # the weights folding removes: the full check decides, down the line while the winner fails, up it while
    # the next larger passes, so the fit passes the full check and its next larger point fails it
    best_report = full_check(best)
    next_report = None
    while not best_report.passed:
        k = inner_values.index(best[inner_key])
        if k == 0:
            raise VisrecError(f"no member of {family} fits {p.name}")
        neighbour, next_report = best, best_report
        best = dict(best, **{inner_key: inner_values[k - 1]})
        best_report = full_check(best)
    why = None
    while neighbour:
        if next_report is None:
            params = model_cost(name, neighbour, p.input_size).params
            if params > MAX_BUILD_PARAMS:  # the grid line ended at the build cap, not at the protocol's limits
                why = f"{params:,} parameters > {MAX_BUILD_PARAMS:,}: too large to build and measure"
                break
            next_report = full_check(neighbour)
        if not next_report.passed:
            break
        best, best_report = neighbour, next_report  # the next larger passes the full check: it is the fit
        neighbour, next_report = after(best), None
    return FitResult(family, p, best, best_report, neighbour, next_report, tried, why)
