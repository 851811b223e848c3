"""The rules of lightning_dopt.combinations: messages, stages, pair support, and the table in docs/strategy.md."""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from lightning_dopt.combinations import (DIMENSIONS, RULES, STAGES, Rule, Setting, check, completion, markdown_table,
                                         pair_support, refusals, with_table)

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "strategy.md")


def only_refusal(rule: Rule) -> Setting:
    """A setting (every fact known) that ``rule`` refuses and no other rule does, drawn at random (seeded)."""
    generator = random.Random(0)
    extra = {"stale_weights": (False, True), "preserve_scale": (False, True), "sync_batchnorm": (False, True),
             "hierarchy": ("flat", "flat", "flat", "node")}  # node refuses AdaCons: drawn less often
    for _ in range(50_000):
        setting = Setting(**{name: generator.choice(values) for name, values in {**DIMENSIONS, **extra}.items()})
        if [r.key for r in refusals(setting)] == [rule.key]:
            return setting
    raise AssertionError(f"no setting is refused by {rule.key} alone")


@pytest.mark.parametrize("rule", RULES, ids=[rule.key for rule in RULES])
def test_every_rule_names_its_options_with_their_values_and_what_to_do(rule: Rule) -> None:
    setting = only_refusal(rule)
    with pytest.raises(ValueError) as raised:
        check(setting)
    message = str(raised.value)
    for option in rule.options:
        assert f"{option}=" in message, (option, message)
    assert " cannot be combined with " in message and rule.instead in message
    assert rule.stage in STAGES


def test_rules_that_read_run_facts_wait_until_they_are_known() -> None:
    early = Setting(scaling="oasis", min_work=0.5)  # precision, optimization mode, accumulation: not known yet
    assert refusals(early) == []
    assert [r.key for r in refusals(replace(early, precision="bf16-mixed"))] == ["oasis-precision"]
    assert [r.key for r in refusals(replace(early, precision="32-true", automatic_optimization=False))] == \
        ["min-work-manual-optimization", "oasis-manual-optimization"]
    stages = {rule.key: rule.stage for rule in RULES}
    assert stages["oasis-precision"] == stages["min-work-sync-batchnorm"] == "trainer"
    assert stages["oasis-accumulation"] == stages["min-work-manual-optimization"] == "fit"
    assert stages["adacons-topology"] == "construction"


def test_pair_support() -> None:
    support = pair_support()
    assert len(support) == sum(len(DIMENSIONS[a]) * len(DIMENSIONS[b]) for i, a in enumerate(DIMENSIONS)
                               for b in list(DIMENSIONS)[i + 1:])
    refused = {pair: rule for pair, rule in support.items() if rule is not None}
    # a refused pair is refused by a rule that names both its options
    for ((first, _), (second, _)), rule in refused.items():
        assert {first, second} <= set(rule.options)
    key = lambda a, b: refused.get((a, b)) or refused.get((b, a))  # noqa: E731
    assert key(("topology", "random"), ("aggregation", "adacons")).key == "adacons-topology"
    assert key(("scaling", "oasis"), ("precision", "16-mixed")).key == "oasis-precision"
    assert key(("overlap", True), ("aggregation", "adacons")).key == "overlap-adacons"
    # three-option rules refuse no pair: AdaCons with scaling is fine once local_steps > 1
    for supported in [(("scaling", "adam"), ("aggregation", "adacons")),
                      (("scaling", "adam"), ("precision", "16-mixed")),
                      (("aggregation", "adacons"), ("min_work", 0.5)), (("overlap", True), ("scaling", "adam")),
                      (("aggregation", "adacons"), ("precision", "16-mixed")),
                      (("compression", "int8"), ("outer_optimizer", "diloco"))]:  # with topology='complete'
        assert supported in support and support[supported] is None, supported
    # every supported pair has a supported setting holding it
    for pair, rule in support.items():
        if rule is None:
            setting = completion(dict(pair))
            assert setting is not None and not refusals(setting)


def test_the_table_in_the_docs_is_the_generated_one() -> None:
    with open(DOCS, encoding="utf-8") as handle:
        document = handle.read()
    assert with_table(document) == document, \
        "docs/strategy.md is out of date: python scripts/combinations_table.py --write docs/strategy.md"
    assert sum(line.startswith("| R") for line in markdown_table().splitlines()) == len(RULES)
