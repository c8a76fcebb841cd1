"""Finding stores by name through the ``ucm.stores`` entry points, and validating their configs."""

from __future__ import annotations

import textwrap

import pytest
from storetest import block_ids, dump_entries, load_entries, make_entries, run_child

from ucm.store import KVStore, open_store
from ucm.store.plugins import available_plugins, load_plugin

INSTALLED = ("posix", "memory", "example-dict")


@pytest.mark.parametrize("name", ["nope", "posx", ""])
def test_unknown_store_name_raises_value_error_listing_installed_stores(name):
    with pytest.raises(ValueError) as excinfo:
        open_store(name)

    assert type(excinfo.value).__name__ == "PluginNotFoundError"
    message = str(excinfo.value)
    assert repr(name) in message or f'"{name}"' in message
    for installed in INSTALLED:
        assert installed in message


def test_available_plugins_lists_installed_stores_sorted():
    names = available_plugins("ucm.stores")

    assert set(INSTALLED) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", INSTALLED)
def test_load_plugin_returns_the_store_class(name):
    store_class = load_plugin("ucm.stores", name, KVStore)

    assert isinstance(store_class, type) and issubclass(store_class, KVStore)
    assert store_class.config_schema


def test_example_dict_store_opens_by_name():
    entries = make_entries(block_ids(5, "example"), num_shards=2)

    with open_store("example-dict", {"num_shards": 2}) as store:
        assert isinstance(store, KVStore)
        dump_entries(store, entries)
        assert load_entries(store, entries) == ([], [])
    with open_store("example-dict") as store:
        assert store.lookup([entries[0][0]]) == [False]  # each instance has its own blocks


ROOT = "<root>"

BAD_CONFIGS = {
    "misspelled key": ("posix", {"roots": ROOT}, "roots"),
    "extra key": ("posix", {"root": ROOT, "capacity": 10}, "capacity"),
    "missing root": ("posix", {}, "root"),
    "root not str": ("posix", {"root": 5}, "root"),
    "threads as str": ("posix", {"root": ROOT, "threads": "8"}, "threads"),
    "threads as float": ("posix", {"root": ROOT, "threads": 8.0}, "threads"),
    "direct_io as int": ("posix", {"root": ROOT, "direct_io": 1}, "direct_io"),
    "num_shards as bool": ("posix", {"root": ROOT, "num_shards": True}, "num_shards"),
    "capacity as str": ("posix", {"root": ROOT, "capacity_bytes": "1G"}, "capacity_bytes"),
    "missing capacity": ("memory", {}, "capacity_bytes"),
    "memory misspelled key": ("memory", {"capacity_bytes": 1 << 20, "write_behind": 5}, "write_behind"),
    "backend not a dict": ("memory", {"capacity_bytes": 1 << 20, "backend": "posix"}, "backend"),
    "backend config misspelled": (
        "memory",
        {"capacity_bytes": 1 << 20, "backend": {"name": "posix", "config": {"roots": ROOT}}},
        "roots",
    ),
    "backend config missing root": (
        "memory",
        {"capacity_bytes": 1 << 20, "backend": {"name": "posix", "config": {}}},
        "root",
    ),
    "unknown backend": ("memory", {"capacity_bytes": 1 << 20, "backend": {"name": "nope", "config": {}}}, "posix"),
    "example-dict misspelled key": ("example-dict", {"num_shard": 2}, "num_shard"),
}


@pytest.mark.parametrize(("name", "config", "named"), list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_raises_value_error_naming_the_key(tmp_path, name, config, named):
    config = _with_root(config, str(tmp_path / "root"))

    with pytest.raises(ValueError, match=rf"\b{named}\b"):
        open_store(name, config)


def _with_root(value, root: str):
    if isinstance(value, dict):
        return {key: _with_root(item, root) for key, item in value.items()}
    return root if value == ROOT else value


@pytest.mark.parametrize(
    ("name", "config", "named"),
    [
        ("posix", {"root": ROOT, "num_shards": 0}, "num_shards"),
        ("posix", {"root": ROOT, "threads": 0}, "threads"),
        ("memory", {"capacity_bytes": -1}, "capacity_bytes"),
        ("memory", {"capacity_bytes": 1 << 20, "num_shards": 0}, "num_shards"),
    ],
)
def test_out_of_range_config_value_raises_value_error_naming_the_key(tmp_path, name, config, named):
    with pytest.raises(ValueError, match=rf"\b{named}\b"):
        open_store(name, _with_root(config, str(tmp_path / "root")))


THIRD_PARTY = """
from ucm.store import KVStore, Option


class GreetingStore(KVStore):
    config_schema = {"greeting": Option(str, "hello", help="what to say"), "num_shards": Option(int, 1)}

    def lookup(self, ids):
        return [False for _ in ids]

    def dump(self, ids, buffers, shards=None):
        self._check_batch(ids, buffers, shards)
        return None

    def load(self, ids, buffers, shards=None):
        self._check_batch(ids, buffers, shards)
        return None

    def wait(self, task):
        pass

    def check(self, task):
        return True

    def remove(self, ids):
        pass


class NotAStore:
    config_schema = {}
"""

OPEN_THIRD_PARTY = """
import sys

import storetest

sys.path.insert(0, storetest.child_args()[0])
from ucm.store import open_store
from ucm.store.plugins import available_plugins

assert {"greeting", "not-a-store"} <= set(available_plugins("ucm.stores")), available_plugins("ucm.stores")
store = open_store("greeting", {"greeting": "hi"})
assert type(store).__name__ == "GreetingStore" and store.config["greeting"] == "hi"
assert store.lookup([b"x"]) == [False]
try:
    open_store("greeting", {"greting": "hi"})
except ValueError as error:
    assert "greting" in str(error), error
else:
    raise AssertionError("a misspelled key was accepted")
try:
    open_store("not-a-store")
except (TypeError, ValueError) as error:
    print("rejected:", error)
else:
    raise AssertionError("a class that is no KVStore was accepted")
"""


def test_a_store_from_another_distribution_opens_by_name(tmp_path):
    (tmp_path / "greeting_store.py").write_text(textwrap.dedent(THIRD_PARTY))
    dist_info = tmp_path / "greeting_store-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: greeting-store\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[ucm.stores]\ngreeting = greeting_store:GreetingStore\nnot-a-store = greeting_store:NotAStore\n"
    )

    out = run_child(OPEN_THIRD_PARTY, str(tmp_path))

    assert "not-a-store" in out or "NotAStore" in out
