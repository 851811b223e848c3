"""Which combinations of :class:`~lightning_dopt.strategy.GossipLocalStrategy`'s options are supported: the one
place that says so. Pure Python, no Lightning.

A :class:`Setting` holds the facts the rules read. They become known at three moments (:data:`STAGES`):

* ``construction``: the strategy's own options;
* ``trainer``: the Trainer's ``precision`` and ``sync_batchnorm`` (when the Trainer is built);
* ``fit``: the module's ``automatic_optimization`` and the Trainer's ``accumulate_grad_batches`` (when ``fit``
  starts, before any process is launched).

Each :class:`Rule` refuses one combination, names every option involved, says why and what to do instead, and is
checked at the earliest moment all its facts are known (:func:`check`). The strategy calls :func:`check` at each
moment; the documentation's support table (:func:`markdown_table`, in ``docs/strategy.md``) and the combination
matrix test are generated from :data:`RULES` and :data:`DIMENSIONS` too, so there is no second list to keep in
sync. A new option that refuses some partner adds its rule here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

STAGES = ("construction", "trainer", "fit")
"""When facts become known, in order."""

FULL_PRECISIONS = ("32-true", "64-true", "32", "64")
"""Lightning precision values whose arithmetic is fp32 or fp64."""


@dataclass(frozen=True)
class Setting:
    """The facts of one configuration. ``None`` for a run fact means "not known yet" (rules that read it wait);
    ``outer_optimizer`` is ``None``, ``"diloco"`` or ``"custom"`` (a factory)."""

    topology: str = "random"
    compression: str | None = None
    overlap: bool = False
    scaling: str | None = None
    aggregation: str = "mean"
    outer_optimizer: str | None = None
    local_steps: int = 1
    min_work: float = 1.0
    warmup_steps: int = 0
    stale_weights: bool = False
    preserve_scale: bool = False
    hierarchy: str = "flat"
    precision: str | None = None
    sync_batchnorm: bool | None = None
    automatic_optimization: bool | None = None
    accumulate_grad_batches: int | None = None


OPTION_STAGES = {"precision": "trainer", "sync_batchnorm": "trainer", "automatic_optimization": "fit",
                 "accumulate_grad_batches": "fit"}
"""The stage at which an option's value is known; the strategy's own options are known at construction."""


def _shown(setting: Setting, option: str) -> str:
    """``option=value`` as a user writes it."""
    value = getattr(setting, option)
    if option == "automatic_optimization" and value is False:
        return "automatic_optimization=False (manual optimization)"
    if option == "outer_optimizer" and value == "custom":
        return "outer_optimizer=<a factory>"
    return f"{option}={value!r}"


@dataclass(frozen=True)
class Rule:
    """A refused combination: ``refuses(setting)`` is true when ``setting`` has it."""

    key: str
    options: tuple[str, ...]
    refuses: Callable[[Setting], bool]
    reason: str
    instead: str

    @property
    def stage(self) -> str:
        """The moment all the rule's facts are known."""
        return max((OPTION_STAGES.get(option, "construction") for option in self.options), key=STAGES.index)

    def applies(self, setting: Setting) -> bool:
        """Whether every fact is known and the combination is the refused one."""
        return all(getattr(setting, option) is not None or option not in OPTION_STAGES for option in self.options) \
            and self.refuses(setting)

    def message(self, setting: Setting) -> str:
        first, *others = (_shown(setting, option) for option in self.options)
        return f"{first} cannot be combined with {' and '.join(others)}: {self.reason}. {self.instead}"


def _adacons(setting: Setting) -> bool:
    return setting.aggregation == "adacons"


def _synchronous_adacons(setting: Setting) -> bool:
    """AdaCons on every step's gradients: no rounds at all."""
    return setting.aggregation == "adacons" and setting.local_steps == 1


RULES: tuple[Rule, ...] = (
    Rule("adacons-topology", ("aggregation", "topology"),
         lambda s: _adacons(s) and s.topology != "complete",
         "AdaCons combines the gradients (local_steps=1) or pseudo-gradients (local_steps>1) of every rank, which "
         "takes all-reduces over all ranks",
         "Use topology='complete', or aggregation='mean' with a gossip topology"),
    Rule("adacons-compression", ("aggregation", "compression"),
         lambda s: _adacons(s) and s.compression is not None,
         "AdaCons weighs each rank's exact vector by its inner product with their mean",
         "Use compression=None, or aggregation='mean' to compress"),
    Rule("outer-gossip-scaling", ("outer_optimizer", "topology", "scaling"),
         lambda s: s.outer_optimizer is not None and s.topology != "complete" and s.scaling is not None,
         "an outer optimizer over a gossip topology mixes parameters and anchors only, not the preconditioner "
         "statistics that scaling keeps per rank",
         "Use topology='complete' with scaling, or scaling=None"),
    Rule("outer-compression-scaling", ("outer_optimizer", "compression", "scaling"),
         lambda s: s.outer_optimizer is not None and s.compression is not None and s.scaling is not None,
         "a compressed outer round mixes the parameters only, not the preconditioner statistics that scaling "
         "shares",
         "Use compression=None with scaling, or scaling=None"),
    Rule("outer-synchronous-adacons", ("outer_optimizer", "aggregation", "local_steps"),
         lambda s: s.outer_optimizer is not None and _synchronous_adacons(s),
         "AdaCons with one local step combines gradients every step and has no rounds for an outer optimizer to "
         "act on",
         "Use local_steps > 1"),
    Rule("scaling-synchronous-adacons", ("scaling", "aggregation", "local_steps"),
         lambda s: s.scaling is not None and _synchronous_adacons(s),
         "scaling refreshes its preconditioner at rounds, and AdaCons with one local step has none",
         "Use local_steps > 1 or aggregation='mean'"),
    Rule("overlap-outer", ("overlap", "outer_optimizer"),
         lambda s: s.overlap and s.outer_optimizer is not None,
         "an outer optimizer needs every rank's current pseudo-gradient at the round, not the previous round's",
         "Use overlap=False"),
    Rule("overlap-adacons", ("overlap", "aggregation"),
         lambda s: s.overlap and _adacons(s),
         "AdaCons needs every rank's current gradient or pseudo-gradient, not the previous round's",
         "Use overlap=False"),
    Rule("min-work-synchronous-adacons", ("min_work", "aggregation", "local_steps"),
         lambda s: s.min_work < 1.0 and _synchronous_adacons(s),
         "a slow rank skips steps between rounds, and AdaCons with one local step combines every rank's gradient "
         "at every step",
         "Use local_steps > 1 or min_work=1.0"),
    Rule("stale-weights-rounds", ("stale_weights", "aggregation", "local_steps"),
         lambda s: _adacons(s) and s.stale_weights and s.local_steps > 1,
         "stale weights apply to per-step gradients; AdaCons rounds always compute fresh weights",
         "Use stale_weights=False"),
    Rule("stale-weights-preserve-scale", ("stale_weights", "aggregation", "preserve_scale"),
         lambda s: _adacons(s) and s.stale_weights and s.preserve_scale,
         "the mean gradient whose scale would be preserved is never computed with stale weights",
         "Use preserve_scale=False with a scale-invariant optimizer such as Adam, or stale_weights=False"),
    Rule("min-work-manual-optimization", ("min_work", "automatic_optimization"),
         lambda s: s.min_work < 1.0 and s.automatic_optimization is False,
         "a slow rank skips whole optimizer steps, and with manual optimization the strategy cannot tell which "
         "optimizer calls make up a step",
         "Use min_work=1.0, or automatic optimization"),
    Rule("min-work-sync-batchnorm", ("min_work", "sync_batchnorm"),
         lambda s: s.min_work < 1.0 and bool(s.sync_batchnorm),
         "a rank that skips a step does not run the forward pass whose BatchNorm layers all-reduce their "
         "statistics, so the ranks would deadlock",
         "Use sync_batchnorm=False or min_work=1.0"),
    Rule("oasis-manual-optimization", ("scaling", "automatic_optimization"),
         lambda s: s.scaling == "oasis" and s.automatic_optimization is False,
         "OASIS re-runs the optimizer step's closure for its Hessian-vector products, and manual optimization "
         "provides none",
         "Use scaling='adam' or 'rmsprop'"),
    Rule("oasis-accumulation", ("scaling", "accumulate_grad_batches"),
         lambda s: s.scaling == "oasis" and s.accumulate_grad_batches is not None and s.accumulate_grad_batches > 1,
         "OASIS's Hessian-vector products re-run the closure, which holds the last micro-batch only",
         "Set accumulate_grad_batches=1, or use scaling='adam' or 'rmsprop'"),
    Rule("manual-optimization-accumulation", ("automatic_optimization", "accumulate_grad_batches"),
         lambda s: s.automatic_optimization is False and s.accumulate_grad_batches is not None
         and s.accumulate_grad_batches > 1,
         "Lightning accumulates gradients for automatic optimization only",
         "Accumulate in your training_step (step the optimizer every k batches), or use automatic optimization"),
    Rule("hierarchy-outer", ("hierarchy", "outer_optimizer"),
         lambda s: s.hierarchy == "node" and s.outer_optimizer is not None,
         "an outer optimizer keeps one anchor per replica and steps it with the whole pseudo-gradient, while "
         "hierarchy='node' splits each round across the node's ranks (not implemented for outer steps)",
         "Use hierarchy='flat' with an outer optimizer, or outer_optimizer=None"),
    Rule("hierarchy-adacons", ("hierarchy", "aggregation"),
         lambda s: s.hierarchy == "node" and _adacons(s),
         "AdaCons weighs every rank's gradient or pseudo-gradient in all-reduces over all ranks, which hierarchy="
         "'node' replaces by node replicas and rounds between nodes",
         "Use hierarchy='flat' with AdaCons, or aggregation='mean'"),
    Rule("hierarchy-oasis", ("hierarchy", "scaling"),
         lambda s: s.hierarchy == "node" and s.scaling == "oasis",
         "OASIS probes the Hessian on each rank's own batch, so the ranks of a node would hold different "
         "preconditioners and stop being one replica",
         "Use scaling='adam' or 'rmsprop' (their statistics come from the node-averaged gradient), or "
         "hierarchy='flat'"),
    Rule("hierarchy-min-work", ("hierarchy", "min_work"),
         lambda s: s.hierarchy == "node" and s.min_work < 1.0,
         "the ranks of a node average their gradients at every step, so one of them cannot skip a step alone",
         "Use min_work=1.0 with hierarchy='node'"),
    Rule("oasis-precision", ("scaling", "precision"),
         lambda s: s.scaling == "oasis" and s.precision not in FULL_PRECISIONS,
         "OASIS takes Hessian-vector products as differences of gradients at x ± 0.001·z, and half-precision "
         "arithmetic (8 to 11 significant bits) turns such differences into noise",
         "Use precision='32-true' (or '64-true'), or scaling='adam' or 'rmsprop' with mixed precision"),
)
"""Every refused combination. A rule's ``refuses`` reads only the options it names."""


def refusals(setting: Setting) -> list[Rule]:
    """The rules that refuse ``setting`` (those whose facts are all known)."""
    return [rule for rule in RULES if rule.applies(setting)]


def check(setting: Setting) -> None:
    """Raise ``ValueError`` naming the options, the reason and what to do instead, for the first rule that refuses
    ``setting``; nothing if it is supported as far as its facts are known."""
    refused = refusals(setting)
    if refused:
        raise ValueError(refused[0].message(setting))


# ----------------------------------------------------------------------------------------- the option space
DIMENSIONS: dict[str, tuple[Any, ...]] = {
    "topology": ("random", "ring", "torus", "exponential", "one_peer_exponential", "complete"),
    "compression": (None, "bf16", "fp16", "int8", "int4"),
    "overlap": (False, True),
    "scaling": (None, "adam", "rmsprop", "oasis"),
    "aggregation": ("mean", "adacons"),
    "outer_optimizer": (None, "diloco"),
    "local_steps": (1, 2),
    "min_work": (1.0, 0.5),
    "warmup_steps": (0, 2),
    "precision": ("32-true", "bf16-mixed", "16-mixed"),
    "automatic_optimization": (True, False),
    "accumulate_grad_batches": (1, 2),
}
"""The option space of the support table and the combination matrix: every value of each option, or a
representative of each behaviour (``local_steps`` 1 or more, ``min_work`` 1 or less, warm-up or not)."""

Pair = tuple[tuple[str, Any], tuple[str, Any]]
_BASE = Setting(sync_batchnorm=False)  # the facts outside DIMENSIONS keep these values


def completion(fixed: dict[str, Any], order: Callable[[str], list[Any]] | None = None,
               ignore: Callable[[Rule], bool] = lambda rule: False) -> Setting | None:
    """A setting of :data:`DIMENSIONS` with the values ``fixed`` that no rule refuses (rules for which ``ignore`` is
    true excepted), or ``None`` if there is none. Depth-first over the other options, trying their values in
    ``order(option)`` (default: :data:`DIMENSIONS`' order); a branch ends as soon as a rule whose options are all
    chosen refuses it."""
    free = [name for name in DIMENSIONS if name not in fixed]
    chosen_outside = {field for field in setting_fields() if field not in DIMENSIONS}

    def search(chosen: dict[str, Any], index: int) -> Setting | None:
        setting = replace(_BASE, **chosen)
        known = set(chosen) | chosen_outside
        if any(rule.refuses(setting) for rule in RULES if set(rule.options) <= known and not ignore(rule)):
            return None
        if index == len(free):
            return setting
        name = free[index]
        for value in (order(name) if order is not None else DIMENSIONS[name]):
            found = search({**chosen, name: value}, index + 1)
            if found is not None:
                return found
        return None

    return search(dict(fixed), 0)


def value_pairs() -> Iterator[Pair]:
    """Every pair of values of two different options of :data:`DIMENSIONS`."""
    for first, second in itertools.combinations(DIMENSIONS, 2):
        for a, b in itertools.product(DIMENSIONS[first], DIMENSIONS[second]):
            yield (first, a), (second, b)


def refusing_rule(pair: Pair) -> Rule | None:
    """``None`` when some supported setting has both values of ``pair``; else the rule that refuses the pair itself
    (one that names both options), shown on a setting that every other rule accepts."""
    if completion(dict(pair)) is not None:
        return None
    names = {pair[0][0], pair[1][0]}
    setting = completion(dict(pair), ignore=lambda rule: names <= set(rule.options))
    refused = [rule for rule in refusals(setting) if names <= set(rule.options)] if setting is not None else []
    if not refused:
        raise AssertionError(f"{pair} is refused, but by no rule that names both options")
    return refused[0]


def pair_support() -> dict[Pair, Rule | None]:
    """:func:`refusing_rule` of every value pair."""
    return {pair: refusing_rule(pair) for pair in value_pairs()}


def markdown_table() -> str:
    """The support table of ``docs/strategy.md``: options × options, each cell ✓ or the rules that refuse some of
    its value pairs, then the rules."""
    support = pair_support()
    names = list(DIMENSIONS)
    numbers = {rule.key: index + 1 for index, rule in enumerate(RULES)}
    cells: dict[tuple[str, str], set[int]] = {}
    for ((first, _), (second, _)), rule in support.items():
        if rule is not None:
            cells.setdefault((first, second), set()).add(numbers[rule.key])
            cells.setdefault((second, first), set()).add(numbers[rule.key])

    def cell(row: str, column: str) -> str:
        if row == column:
            return "·"
        refused = sorted(cells.get((row, column), ()))
        return " ".join(f"R{number}" for number in refused) if refused else "✓"

    lines = ["| | " + " | ".join(f"`{name}`" for name in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| `{row}` | " + " | ".join(cell(row, column) for column in names) + " |" for row in names]
    lines += ["", "| rule | refused combination | checked at | why | instead |", "|---|---|---|---|---|"]
    for rule in RULES:
        combination = " with ".join(f"`{option}`" for option in rule.options)
        lines.append(f"| R{numbers[rule.key]} `{rule.key}` | {combination} | {rule.stage} | {rule.reason} | "
                     f"{rule.instead} |")
    return "\n".join(lines)


def setting_fields() -> tuple[str, ...]:
    """The names of :class:`Setting`'s facts."""
    return tuple(field.name for field in fields(Setting))


TABLE_BEGIN = ("<!-- combinations table: generated by `python scripts/combinations_table.py --write docs/strategy.md`"
               " -->")
TABLE_END = "<!-- end of the combinations table -->"


def with_table(document: str) -> str:
    """``document`` with the text between :data:`TABLE_BEGIN` and :data:`TABLE_END` replaced by
    :func:`markdown_table`."""
    start, end = document.index(TABLE_BEGIN) + len(TABLE_BEGIN), document.index(TABLE_END)
    return f"{document[:start]}\n{markdown_table()}\n{document[end:]}"
