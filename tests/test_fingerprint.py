"""Stage records: what makes a finished stage stale, and what its message says."""

from minitron.data.fingerprint import differences, make_record, stale_reason, write_record


def _prune_record(**target):
    return make_record("prune", {"target": {"hidden": 64, **target}, "dtype": "float32"},
                       {"model": {"model": "default", "files": "abc"}})


def test_setting_added_later_at_none_keeps_the_stage(tmp_path):
    """A record written before `target.experts` existed stays fresh when the new setting is unset (None)."""
    write_record(tmp_path, _prune_record())
    newer = _prune_record(experts=None, top_k=None)
    assert newer["fingerprint"] != _prune_record()["fingerprint"]
    assert stale_reason(tmp_path, newer) is None


def test_setting_added_later_with_a_value_names_it(tmp_path):
    write_record(tmp_path, _prune_record())
    assert stale_reason(tmp_path, _prune_record(experts=4)) == "target.experts: (unset) -> 4"


def test_a_setting_that_became_none_is_a_change(tmp_path):
    write_record(tmp_path, _prune_record(experts=4))
    assert stale_reason(tmp_path, _prune_record(experts=None)) == "target.experts: 4 -> None"


def test_changed_value_and_input_are_named(tmp_path):
    write_record(tmp_path, _prune_record())
    changed = make_record("prune", {"target": {"hidden": 48}, "dtype": "float32"},
                          {"model": {"model": "default", "files": "def"}})
    assert stale_reason(tmp_path, changed) == "target.hidden: 64 -> 48; input model changed"


def test_json_form_counts_as_the_digest_does():
    """A tuple is the list JSON writes (no difference); an int and a float are not the same JSON."""
    old = make_record("prune", {"drop": [1, 2], "params": 70000000}, {})
    assert differences(old, make_record("prune", {"drop": (1, 2), "params": 70000000}, {})) == []
    assert differences(old, make_record("prune", {"drop": [1, 2], "params": 70000000.0}, {})) == [
        "params: 70000000 -> 70000000.0"]


def test_empty_setting_dict_is_not_lost():
    old = make_record("eval", {"tasks": {}}, {})
    assert differences(old, make_record("eval", {"tasks": {"arc": 1}}, {})) == ["tasks: {} -> (unset)",
                                                                                "tasks.arc: (unset) -> 1"]
