"""Storage round trips on both backends: a local folder and S3 (moto_server on 127.0.0.1)."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest
from banditroute.testkit.s3server import S3Server, s3_server, s3_storage_config  # noqa: F401  (fixtures)

from banditroute.core.config import ConfigError, from_dict
from banditroute.core.storage import Storage, StorageConfig, StorageUnavailable, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    """The same tests run against both backends."""
    if request.param == "local":
        return open_storage(StorageConfig(uri=str(tmp_path / "store")))
    return open_storage(request.getfixturevalue("s3_storage_config"))


def test_bytes_round_trip_and_overwrite(storage: Storage):
    storage.write_bytes("a/b/blob.bin", b"\x00\x01payload")
    assert storage.read_bytes("a/b/blob.bin") == b"\x00\x01payload"
    storage.write_bytes("a/b/blob.bin", b"second")
    assert storage.read_bytes("a/b/blob.bin") == b"second"
    assert storage.exists("a/b/blob.bin")
    assert not storage.exists("a/b/other.bin")
    # a "folder" is not an object
    assert not storage.exists("a/b")


def test_json_round_trip(storage: Storage):
    entry = {"version": 3, "models": ["gpt-4", "llama-3-8b"], "tau": 0.5, "nested": {"ok": True}}
    storage.write_json("registry/v3.json", entry)
    assert storage.read_json("registry/v3.json") == entry


def test_parquet_round_trip(storage: Storage):
    table = pa.table(
        {
            "decision_id": ["d1", "d2", "d3"],
            "probability": [0.5, 0.25, 0.125],
            "embedding": pa.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], type=pa.list_(pa.float32())),
        }
    )
    storage.write_parquet("events/part-0001.parquet", table)
    loaded = storage.read_parquet("events/part-0001.parquet")
    assert loaded.equals(table)
    assert loaded.schema == table.schema


def test_list_is_sorted_recursive_and_relative(storage: Storage):
    for key in ["events/b.parquet", "events/a.parquet", "events/2024/c.parquet", "ckpt/1.bin"]:
        storage.write_bytes(key, b"x")
    assert storage.list("events") == ["events/2024/c.parquet", "events/a.parquet", "events/b.parquet"]
    assert storage.list("events/") == storage.list("events")
    assert storage.list() == sorted(["ckpt/1.bin", "events/2024/c.parquet", "events/a.parquet", "events/b.parquet"])
    assert storage.list("nothing-here") == []


def test_delete(storage: Storage):
    storage.write_bytes("tmp/x", b"1")
    storage.delete("tmp/x")
    assert not storage.exists("tmp/x")
    with pytest.raises(FileNotFoundError, match="tmp/x"):
        storage.delete("tmp/x")
    storage.delete("tmp/x", missing_ok=True)


def test_missing_key_names_the_key(storage: Storage):
    with pytest.raises(FileNotFoundError, match="no/such/key.json"):
        storage.read_bytes("no/such/key.json")
    with pytest.raises(FileNotFoundError, match="no/such/table.parquet"):
        storage.read_parquet("no/such/table.parquet")


def test_child_storage_shares_the_backend(storage: Storage):
    checkpoints = storage.child("checkpoints")
    checkpoints.write_bytes("v1.pt", b"weights")
    assert storage.read_bytes("checkpoints/v1.pt") == b"weights"
    assert checkpoints.list() == ["v1.pt"]
    assert checkpoints.uri_for("v1.pt") == storage.uri_for("checkpoints/v1.pt")


@pytest.mark.parametrize("bad", ["", "/", "../escape", "a/../b", "a//b", "./a"])
def test_keys_cannot_escape_the_root(storage: Storage, bad: str):
    with pytest.raises(ValueError):
        storage.write_bytes(bad, b"x")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path))
    storage.write_bytes("dir/f.bin", b"1" * 1000)
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["f.bin"]

    # A write that fails before the rename (here: the disk refuses fsync) leaves
    # the previous version intact and no temporary file behind.
    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("banditroute.core.storage.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes("dir/f.bin", b"2" * 1000)
    monkeypatch.undo()
    assert storage.read_bytes("dir/f.bin") == b"1" * 1000
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["f.bin"]


def test_uris(tmp_path, s3_server: S3Server):
    local = open_storage(f"file://{tmp_path}")
    assert local.uri_for("a/b.parquet") == f"file://{tmp_path}/a/b.parquet"
    assert local.path_for("a/b.parquet") == f"{tmp_path}/a/b.parquet"
    plain = open_storage(str(tmp_path))
    assert plain.uri_for() == f"file://{tmp_path}"
    remote = open_storage(s3_server.storage_config(bucket="uris-bucket", prefix="/runs/7/"))
    assert remote.uri_for() == "s3://uris-bucket/runs/7"
    assert remote.uri_for("events/x.parquet") == "s3://uris-bucket/runs/7/events/x.parquet"


def test_s3_prefix_isolates_keys(s3_server: S3Server):
    bucket = s3_server.create_bucket()
    one = open_storage(s3_server.storage_config(bucket, prefix="one"))
    two = open_storage(s3_server.storage_config(bucket, prefix="two"))
    one.write_bytes("k", b"1")
    assert two.list() == []
    assert not two.exists("k")
    whole = open_storage(s3_server.storage_config(bucket))
    assert whole.list() == ["one/k"]


def test_s3_missing_bucket_is_file_not_found(s3_server: S3Server):
    storage = open_storage(s3_server.storage_config(bucket="bucket-that-was-never-made"))
    with pytest.raises(FileNotFoundError):
        storage.write_bytes("k", b"1")


def test_create_bucket_option(s3_server: S3Server):
    config = s3_server.storage_config(bucket="made-by-storage", create_bucket=True)
    storage = open_storage(config)
    storage.write_bytes("k", b"1")
    assert storage.read_bytes("k") == b"1"


def test_unreachable_endpoint_fails_fast():
    # Nothing listens on a port we just closed: connection refused, StorageUnavailable at once.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = StorageConfig(
        uri="s3://nowhere/prefix",
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout_s=0.5,
        request_timeout_s=0.5,
        max_attempts=2,
    )
    storage = open_storage(config)
    for action in (
        lambda: storage.write_bytes("k", b"1"),
        lambda: storage.read_bytes("k"),
        lambda: storage.exists("k"),
        lambda: storage.list(),
        lambda: storage.delete("k"),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="s3://nowhere/prefix"):
            action()
        assert time.monotonic() - started < 3.0


def test_s3_stopped_then_back(s3_server: S3Server):
    config = s3_server.storage_config()
    storage = open_storage(config)
    storage.write_bytes("before", b"1")
    with s3_server.unavailable("stopped"):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            storage.write_bytes("during", b"2")
        assert time.monotonic() - started < 3.0
    # moto keeps data in memory: the bucket is back, empty, and writes work again.
    storage.write_bytes("after", b"3")
    assert storage.list() == ["after"]


def test_s3_hanging_server_times_out(s3_server: S3Server):
    storage = open_storage(s3_server.storage_config(request_timeout_s=1.0, max_attempts=1))
    storage.write_bytes("k", b"1")
    with s3_server.unavailable("paused"):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            storage.read_bytes("k")
        assert time.monotonic() - started < 4.0
    assert storage.read_bytes("k") == b"1"


def test_credentials_come_from_named_env_vars(s3_server: S3Server, monkeypatch):
    monkeypatch.setenv("MY_KEY_ID", "testing")
    monkeypatch.setenv("MY_SECRET", "testing")
    config = s3_server.storage_config(access_key_id_env="MY_KEY_ID", secret_access_key_env="MY_SECRET")
    storage = open_storage(config)
    storage.write_bytes("k", b"1")
    monkeypatch.delenv("MY_SECRET")
    with pytest.raises(ValueError, match="MY_SECRET"):
        open_storage(config)


def test_config_from_yaml_mapping_and_validation():
    config = from_dict(
        StorageConfig,
        {"uri": "s3://bucket/events", "endpoint_url": "http://127.0.0.1:9000", "max_attempts": "2"},
    )
    assert config.is_s3 and config.max_attempts == 2
    with pytest.raises(ConfigError):
        from_dict(StorageConfig, {"uri": "s3://b", "secret_access_key": "oops"})
    for bad in (
        {"uri": "gs://bucket"},
        {"uri": "s3://"},
        {"uri": "s3://b", "endpoint_url": "127.0.0.1:9000"},
        {"uri": "x", "connect_timeout_s": 0},
        {"uri": "x", "max_attempts": 0},
    ):
        with pytest.raises(ValueError) as info:
            from_dict(StorageConfig, bad)
        assert "storage." in str(info.value)


def test_local_writes_fsync_the_folder_and_every_new_partition_folder(tmp_path, monkeypatch):
    """A rename and a new dt=/hr= folder are only durable once their parent folder is fsynced."""
    from banditroute.core import storage as storage_module

    synced: list[str] = []
    real = storage_module._fsync_dir
    monkeypatch.setattr(storage_module, "_fsync_dir", lambda d: (synced.append(os.path.relpath(d, tmp_path)), real(d)))
    store = open_storage(str(tmp_path / "root"))
    store.write_bytes("events/dt=2026-11-29/hr=17/part-1.parquet", b"x")
    # root, events, dt=, hr= were created: each parent fsynced once, then the folder holding the renamed file.
    assert synced == [".", "root", "root/events", "root/events/dt=2026-11-29", "root/events/dt=2026-11-29/hr=17"]
    synced.clear()
    store.write_bytes("events/dt=2026-11-29/hr=17/part-2.parquet", b"y")
    assert synced == ["root/events/dt=2026-11-29/hr=17"]  # existing folders: only the rename's
