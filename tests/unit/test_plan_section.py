"""`replicad apply -f` with `plans:` (issue 19 item 2): the section is read strictly, every
error with its YAML path, and each VM written as NAME, NAME:DELAY or {vm, delay}."""

import pytest

from replicad.cli.apply import load
from replicad.errors import ConfigError


def test_a_plan_may_be_a_consistency_group(tmp_path):
    doc = tmp_path / "site.yaml"
    doc.write_text("plans:\n  - name: shop\n    vms: [db, app]\n    consistency: group\n")
    assert load(str(doc))["plans"] == [{"name": "shop", "vms": [{"vm": "db", "delay": 0}, {"vm": "app", "delay": 0}],
                                        "consistency": "group"}]


def test_plans_are_read_in_every_form(tmp_path):
    doc = tmp_path / "site.yaml"
    doc.write_text("plans:\n  - name: shop\n    vms: [db, 'app:30s', {vm: web, delay: 2m}, {vm: cache, delay: 5}]\n")
    assert load(str(doc))["plans"] == [{"name": "shop", "vms": [
        {"vm": "db", "delay": 0}, {"vm": "app", "delay": 30}, {"vm": "web", "delay": 120},
        {"vm": "cache", "delay": 5}]}]


@pytest.mark.parametrize("text, said", [
    ("plans: shop\n", "plans: expected a list"),
    ("plans:\n  - name: shop\n", "plans[0].vms: a list of one or more VMs"),
    ("plans:\n  - vms: [db]\n", "plans[0].name: required"),
    ("plans:\n  - name: shop\n    vms: [db]\n    order: 1\n", "plans[0]: expected a mapping with name, vms and"),
    ("plans:\n  - name: shop\n    vms: [db]\n    consistency: crash\n", "plans[0].consistency: group or none"),
    ("plans:\n  - name: shop\n    vms: ['db:soon']\n", "plans[0].vms[0]: --vm db:soon"),
    ("plans:\n  - name: shop\n    vms: [{vm: db, delay: true}]\n", "plans[0].vms[0]: delay"),
    ("plans:\n  - name: shop\n    vms: [db]\n  - name: shop\n    vms: [web]\n", "plans[1].name: 'shop' appears twice"),
])
def test_a_bad_plans_section_names_the_place(tmp_path, text, said):
    doc = tmp_path / "site.yaml"
    doc.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(str(doc))
    assert said in str(e.value)
