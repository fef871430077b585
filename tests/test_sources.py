"""Sources: hub repo ids through a hub cache laid out as huggingface_hub lays it out, object
storage through a real S3 server on 127.0.0.1 (moto), faults through a proxy in front of it,
and ``verify=True``. Every load is compared byte for byte with safetensors' own load of the
same files, and every plan with the plan of the local checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import huggingface_hub.constants
import pytest
import safetensors.torch
import torch

import streamload
from streamload.events import Event, LayerPlaced, PlanComputed
from streamload.sources._object import FIRST_READ, RESUMES, _store
from streamload.sources._signed import SignedRanges
from streamload.testing import SimulatedGPU
from tests.engine_support import assert_identical, params, reference
from tests.sources_support import (
    Faults,
    closed_port,
    encoder,
    files_under,
    moto_s3,
    s3_env,
    sharded,
    single,
    start_proxy,
    upload,
    write_hub_cache,
)

pytestmark = pytest.mark.anyio
REPO = "tiny-org/tiny-llama"
BUCKET = "models"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- hub ---------------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A local checkpoint and an offline hub cache holding it as ``REPO``. huggingface_hub reads
    ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, so the test sets the values it
    read (the command-line test below sets the variables themselves, in a fresh process)."""
    local = sharded(tmp_path / "local")
    cache = tmp_path / "hub"
    write_hub_cache(cache, REPO, local)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local path named like the repo id
    return local, cache


async def test_a_repo_id_loads_from_the_offline_cache_bit_identical(
    hub: tuple[Path, Path],
) -> None:
    """``org/name`` resolves in the hub cache at ``main``; the load equals safetensors' load of
    the same files, the plan equals the local checkpoint's, and placements name the blobs."""
    local, _ = hub
    got: list[Event] = []
    p = params(["cpu"], cpu_memory_bytes=2**33)  # fixed: available memory moves
    model = await streamload.load(REPO, p, on_event=got.append)
    assert_identical(model.tensors, reference(local), None)
    assert streamload.plan(local, p).to_dict() == streamload.plan(REPO, p).to_dict()
    assert REPO == next(e for e in got if isinstance(e, PlanComputed)).path
    placed = [e for e in got if isinstance(e, LayerPlaced)]
    assert all(f.rsplit("/", 2)[-2] == "blobs" for e in placed for f in e.files)


def test_a_cache_folder_or_a_snapshot_path_works_too(hub: tuple[Path, Path]) -> None:
    """The ``models--org--name`` folder (at ``revision``) and a snapshot folder inspect like
    the repo id; a revision the folder lacks is a ``SourceError`` naming it."""
    _, cache = hub
    folder = cache / "models--tiny-org--tiny-llama"
    want = streamload.inspect(REPO)
    assert want == streamload.inspect(folder)
    assert want == streamload.inspect(next((folder / "snapshots").iterdir()))
    with pytest.raises(streamload.SourceError, match="'v2'"):
        streamload.inspect(folder, params=streamload.LoadParams(revision="v2"))


@pytest.mark.parametrize(
    ("repo", "revision"), [("tiny-org/missing", "main"), (REPO, "refs-that-are-not-there")]
)
def test_hub_misses_name_the_id_and_the_revision(
    hub: tuple[Path, Path], repo: str, revision: str
) -> None:
    """Offline, an id or a revision the cache does not hold is a ``SourceError`` naming both."""
    with pytest.raises(streamload.SourceError) as raised:
        streamload.plan(repo, params(["cpu"], revision=revision))
    assert (repo, revision) == (raised.value.source, raised.value.revision)
    assert "offline" in str(raised.value).lower() or "cache" in str(raised.value)


async def test_verify_checks_every_hub_blob_through_either_path(hub: tuple[Path, Path]) -> None:
    """``verify=True``: every file's sha256 (computed from the bytes the load read, in file
    order whatever order the lanes read them in) matches its blob name, on the CPU path and on
    the staged path of a simulated GPU."""
    local, _ = hub
    for devices in (["cpu"], [SimulatedGPU("sim:0", total_bytes=2**30), "cpu"]):
        model = await streamload.load(REPO, params(devices, verify=True))
        assert_identical(model.tensors, reference(local), None)
        assert 3 == len(model.report.checks)
        assert () == model.report.unverified
        model.release()


async def test_a_corrupt_blob_is_caught_and_the_load_releases_everything(
    hub: tuple[Path, Path],
) -> None:
    """A flipped byte in a shard's tensor data: without ``verify`` the load succeeds (nothing
    else looks at the bytes); with it, ``ChecksumError`` names the file and nothing stays
    allocated on the simulated GPU."""
    _, cache = hub
    blobs = sorted((cache / "models--tiny-org--tiny-llama" / "blobs").iterdir())
    blob = next(b for b in blobs if len(b.name) == 64)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    (await streamload.load(REPO, params([gpu, "cpu"]))).release()
    with pytest.raises(streamload.ChecksumError) as raised:
        await streamload.load(REPO, params([gpu, "cpu"], verify=True))
    assert blob.name in str(raised.value)
    assert isinstance(raised.value, streamload.CheckpointError)
    assert 0 == gpu.allocated_bytes


async def test_files_without_a_recorded_checksum_are_reported_unverified(
    hub: tuple[Path, Path],
) -> None:
    """A plain local directory records no checksums: each file is listed as unverified."""
    local, _ = hub
    model = await streamload.load(local, params(["cpu"], verify=True))
    assert 3 == len(model.report.unverified)
    assert {"its source records no checksum"} == {c.reason for c in model.report.unverified}


def test_the_command_line_reads_the_hub_environment(hub: tuple[Path, Path]) -> None:
    """``streamload inspect org/name`` in a fresh process finds the repo through
    ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` as huggingface_hub reads them."""
    _, cache = hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "streamload", "inspect", REPO, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert 0 == done.returncode, done.stderr
    summary = json.loads(done.stdout)
    assert 4 == summary["layers"]["count"]
    assert all(Path(file).parent.name == "blobs" for file in summary["files"])


# --- object storage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    endpoint: str
    client: Any
    local: dict[str, Path]  # prefix -> the local checkpoint uploaded under it


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A moto S3 server on 127.0.0.1 with a single-file, a sharded and an encoder checkpoint
    uploaded (checksums recorded), and one uploaded without checksums."""
    root = tmp_path_factory.mktemp("s3")
    local = {
        "single": single(root / "single"),
        "sharded": sharded(root / "sharded"),
        "encoder": encoder(root / "encoder"),
    }
    with moto_s3(BUCKET) as (endpoint, client):
        for prefix, directory in local.items():
            upload(client, BUCKET, prefix, directory)
        upload(client, BUCKET, "plain", local["single"], checksum=False)
        yield Store(endpoint, client, local)


@pytest.fixture
def s3(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    for key, value in s3_env(store.endpoint).items():
        monkeypatch.setenv(key, value)
    return store


@pytest.fixture(params=["signed", "collected"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How tensor bytes are read: by presigned GETs into the destination (S3's way), or
    collected by obstore and copied (the way for GCS, Azure and behind a proxy), forced here
    through the rule that picks it."""
    if request.param == "collected":
        monkeypatch.setattr(SignedRanges, "for_store", lambda *args: None)
    return str(request.param)


@pytest.mark.parametrize("prefix", ["single", "sharded", "encoder"])
async def test_an_s3_prefix_loads_bit_identical_and_plans_as_the_local_copy(
    s3: Store, prefix: str, transport: str
) -> None:
    """Single file, sharded index and an encoder, either transport: the load from ``s3://``
    equals safetensors' load of the local files, onto a simulated GPU (staged) and the CPU; the
    plan is the local plan; placements name the objects by URL."""
    url = f"s3://{BUCKET}/{prefix}"
    local = s3.local[prefix]
    # A fixed host budget: the host's available memory moves between two readings.
    p = params([SimulatedGPU("sim:0", total_bytes=400_000), "cpu"], cpu_memory_bytes=2**33)
    assert streamload.plan(local, p).to_dict() == streamload.plan(url, p).to_dict()
    got: list[Event] = []
    model = await streamload.load(url, p, on_event=got.append)
    assert_identical(model.tensors, reference(local), None)
    files = {f for e in got if isinstance(e, LayerPlaced) for f in e.files}
    assert files == {f"{url}/{f.name}" for f in local.glob("*.safetensors")}


async def test_verify_checks_objects_with_a_recorded_sha256(s3: Store) -> None:
    """Objects uploaded with a SHA256 checksum are verified; without one, unverified."""
    model = await streamload.load(f"s3://{BUCKET}/sharded", params(["cpu"], verify=True))
    assert (3, ()) == (len(model.report.checks), model.report.unverified)
    plain = await streamload.load(f"s3://{BUCKET}/plain", params(["cpu"], verify=True))
    assert ["its source records no checksum"] == [c.reason for c in plain.report.unverified]


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        (f"s3://{BUCKET}/nothing-here", streamload.SourceError, "no objects under this prefix"),
        ("s3://no-such-bucket/x", streamload.SourceError, "no such bucket"),
    ],
)
def test_a_missing_prefix_or_bucket_names_the_url(
    s3: Store, url: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words) as raised:
        streamload.inspect(url)
    assert url in str(raised.value)


def test_a_shard_or_index_entry_missing_from_the_store_names_the_object(s3: Store) -> None:
    """An index naming a shard the prefix lacks is ``MissingShardError``; one that lists a
    tensor no shard holds is ``IndexMismatchError``; both name ``s3://`` URLs."""
    local = s3.local["sharded"]
    index = (local / "model.safetensors.index.json").read_text()
    for prefix, text, error in [
        ("no-shard", index.replace("00003-of", "00009-of"), streamload.MissingShardError),
        (
            "no-entry",
            index.replace("}}", ', "ghost.weight": "model-00001-of-00003.safetensors"}}'),
            streamload.IndexMismatchError,
        ),
    ]:
        for file in local.iterdir():
            body = text.encode() if file.name.endswith(".index.json") else file.read_bytes()
            s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{file.name}", Body=body)
        with pytest.raises(error, match=f"s3://{BUCKET}/{prefix}/"):
            streamload.inspect(f"s3://{BUCKET}/{prefix}")


def test_a_refused_connection_fails_within_the_connect_timeout(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint nothing listens on: ``SourceUnreachableError``, not minutes of retries."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(streamload.SourceUnreachableError, match="cannot be reached"):
        streamload.inspect(f"s3://{BUCKET}/single", params=streamload.LoadParams(connect_timeout=1))


def test_access_denied_names_the_url(s3: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    url, stop = start_proxy(s3.endpoint, Faults(deny=True))
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        with pytest.raises(streamload.SourceError, match="access denied"):
            streamload.inspect(f"s3://{BUCKET}/single")
    finally:
        stop()


def _ranged_gets(faults: Faults, prefix: str) -> dict[str, list[str]]:
    """The ranges asked of each object under ``prefix`` through the proxy, by object name."""
    gets: dict[str, list[str]] = {}
    for method, path, asked in faults.seen:
        head, _, name = path.split("?")[0].rpartition("/")
        if method == "GET" and asked and head.endswith(f"/{prefix}"):
            gets.setdefault(name, []).append(asked)
    return gets


async def test_a_header_takes_one_speculative_read_and_a_longer_one_a_second(
    s3: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Planning reads each shard's header with one ranged GET of its first ``FIRST_READ``
    bytes (a sharded prefix is not listed); a header longer than that costs one more GET for
    exactly the rest; an object shorter than it is read whole by the first. Each loads
    bit-identical to its local copy and plans as it does."""
    long_header = single(tmp_path / "long")
    tensors = safetensors.torch.load_file(long_header / "model.safetensors")
    padding = {"padding": "x" * (FIRST_READ + 10_000)}  # pushes the header past the first read
    safetensors.torch.save_file(tensors, long_header / "model.safetensors", metadata=padding)
    small = encoder(tmp_path / "small")
    tensors = safetensors.torch.load_file(small / "model.safetensors")
    half = {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    safetensors.torch.save_file(half, small / "model.safetensors")
    assert (small / "model.safetensors").stat().st_size < FIRST_READ
    for prefix, local in [("long-header", long_header), ("small", small)]:
        upload(s3.client, BUCKET, prefix, local)
    faults = Faults()
    url, stop = start_proxy(s3.endpoint, faults)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    p = params(
        ["cpu"], cpu_memory_bytes=2**33, chunk_bytes=2**18, staging_bytes=2**20
    )  # few requests: a slow proxy
    first = f"bytes=0-{FIRST_READ - 1}"
    try:
        cases = [("sharded", s3.local["sharded"]), ("long-header", long_header), ("small", small)]
        for prefix, local in cases:
            faults.seen.clear()
            source = f"s3://{BUCKET}/{prefix}"
            assert streamload.plan(local, p).to_dict() == streamload.plan(source, p).to_dict()
            gets = _ranged_gets(faults, prefix)
            shards = sorted(f.name for f in local.glob("*.safetensors"))
            assert shards == sorted(gets)
            listed = [path for _, path, _ in faults.seen if "list-type=" in path]
            if prefix == "sharded":
                assert all([first] == gets[name] for name in shards)
                assert [] == listed
            elif prefix == "small":
                assert [first] == gets["model.safetensors"]
            else:
                with (local / "model.safetensors").open("rb") as file:
                    end = 8 + int.from_bytes(file.read(8), "little")
                assert [first, f"bytes={FIRST_READ}-{end - 1}"] == gets["model.safetensors"]
            model = await streamload.load(source, p)
            assert_identical(model.tensors, reference(local), None)
            model.release()
    finally:
        stop()


def test_a_sharded_prefix_needs_no_listing_a_single_file_does(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With listings denied (a policy without ``ListBucket``) a sharded prefix, found by its
    index, still plans; a single-file prefix, found by listing, is an access-denied error
    naming it; a URL naming the file needs no listing."""
    url, stop = start_proxy(s3.endpoint, Faults(deny_listing=True))
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    p = params(["cpu"], cpu_memory_bytes=2**33)
    try:
        local = streamload.plan(s3.local["sharded"], p)
        assert local.to_dict() == streamload.plan(f"s3://{BUCKET}/sharded", p).to_dict()
        with pytest.raises(streamload.SourceError, match="access denied") as raised:
            streamload.plan(f"s3://{BUCKET}/single", p)
        assert f"s3://{BUCKET}/single" in str(raised.value)
        named = f"s3://{BUCKET}/single/model.safetensors"
        assert streamload.plan(s3.local["single"], p).layer_devices == (
            streamload.plan(named, p).layer_devices
        )
    finally:
        stop()


def test_an_empty_object_is_a_checkpoint_error(s3: Store) -> None:
    """A zero-byte shard (no range of it exists) is reported as a too-short file, naming it."""
    s3.client.put_object(Bucket=BUCKET, Key="empty/model.safetensors", Body=b"")
    s3.client.put_object(Bucket=BUCKET, Key="empty/config.json", Body=b"{}")
    with pytest.raises(streamload.CheckpointError, match=f"s3://{BUCKET}/empty/model.safetensors"):
        streamload.inspect(f"s3://{BUCKET}/empty")


def test_mmap_is_refused_for_objects(s3: Store) -> None:
    with pytest.raises(streamload.SourceError, match="cpu_policy='mmap'"):
        streamload.plan(f"s3://{BUCKET}/single", params(["cpu"], cpu_policy="mmap"))


@pytest.mark.parametrize("drops", [2, -1])
async def test_a_dropped_connection_is_resumed_then_reported(
    s3: Store, monkeypatch: pytest.MonkeyPatch, drops: int, transport: str
) -> None:
    """A server that drops ranged GETs of one object mid-body: two drops are resumed (the load
    is bit-identical); drops every time fail after bounded retries with a ``SourceError``
    naming the object and the byte offset, and the simulated GPU holds nothing."""
    faults = Faults(target="sharded/model-00002-of-00003.safetensors", drop_after=1000)
    url, stop = start_proxy(s3.endpoint, faults)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    source = f"s3://{BUCKET}/sharded"
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    p = params([gpu, "cpu"], chunk_bytes=2**16, staging_bytes=2**18)  # few requests: a slow proxy
    try:
        plan_first = streamload.plan(source, p)  # headers before any drop
        faults.drops = drops
        if drops > 0:
            model = await streamload.load(source, p)
            assert_identical(model.tensors, reference(s3.local["sharded"]), None)
            assert plan_first.layer_devices == model.plan.layer_devices
            assert drops == faults.dropped
            return
        with pytest.raises(streamload.SourceError) as raised:
            await streamload.load(source, p)
        assert f"{source}/model-00002-of-00003.safetensors" in str(raised.value)
        assert "at byte" in str(raised.value)
        assert 0 == gpu.allocated_bytes
    finally:
        stop()


def _signed(path: str) -> bool:
    return "X-Amz-Signature=" in path


async def test_tensor_bytes_come_by_presigned_gets_on_kept_connections(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 every tensor byte is requested by a ranged GET of a presigned URL carrying the
    ETag as ``If-Match`` (headers are read through obstore, signed in the header), and
    connections are kept: far fewer than the requests, at most one per reader thread."""
    faults = Faults()
    url, stop = start_proxy(s3.endpoint, faults)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    p = params(["cpu"], chunk_bytes=2**14, cpu_memory_bytes=2**33)  # many requests
    local = s3.local["sharded"]
    try:
        model = await streamload.load(f"s3://{BUCKET}/sharded", p)
        assert_identical(model.tensors, reference(local), None)
    finally:
        stop()
    signed = [(path, asked) for _, path, asked in faults.seen if _signed(path)]
    headers = [asked for _, path, asked in faults.seen if asked and not _signed(path)]
    assert [f"bytes=0-{FIRST_READ - 1}"] * 3 == headers
    data = sum(f.stat().st_size - 8 for f in local.glob("*.safetensors"))
    assert len(signed) > 20
    asked = 0
    for _, ranged in signed:
        first, last = map(int, ranged.removeprefix("bytes=").split("-"))
        asked += last - first + 1
    assert model.read_bytes == asked
    assert asked < data  # the headers are not read again
    etags = {json.loads(obj["ETag"]) for obj in _objects(s3, "sharded")}
    assert len(signed) + len(headers) - 3 <= len(faults.if_match)
    assert {tag.strip('"') for tag in faults.if_match} <= etags
    connections = {peer for path, peer in faults.peers if _signed(path)}
    assert len(connections) <= p.reader_threads < len(signed)


def _objects(s3: Store, prefix: str) -> list[dict[str, Any]]:
    listing = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return [obj for obj in listing["Contents"] if obj["Key"].endswith(".safetensors")]


async def _load_faulted_once_planned(
    s3: Store, monkeypatch: pytest.MonkeyPatch, faults: Faults, **armed: int
) -> None:
    """Load the sharded prefix to the CPU through a proxy applying ``faults``, with the
    ``armed`` fault fields set once the plan is computed (the header reads are done, so only
    tensor reads meet the faults); the load is bit-identical."""
    url, stop = start_proxy(s3.endpoint, faults)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)

    def arm(event: Event) -> None:
        if isinstance(event, PlanComputed):
            for name, value in armed.items():
                setattr(faults, name, value)

    try:
        model = await streamload.load(
            f"s3://{BUCKET}/sharded",
            params(["cpu"], chunk_bytes=2**18, staging_bytes=2**20),
            on_event=arm,
        )
        assert_identical(model.tensors, reference(s3.local["sharded"]), None)
    finally:
        stop()


async def test_a_dropped_body_is_resumed_from_the_byte_it_reached(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A presigned GET whose connection drops after 1000 bytes of its body is asked again for
    the rest only, from the byte the body reached; the load is bit-identical."""
    target = "sharded/model-00002-of-00003.safetensors"
    faults = Faults(target=target, drop_after=1000)
    await _load_faulted_once_planned(s3, monkeypatch, faults, drops=1)
    assert 1 == faults.dropped
    ranges = [asked for _, path, asked in faults.seen if _signed(path) and target in path]
    first, last = map(int, ranges[0].removeprefix("bytes=").split("-"))
    assert f"bytes={first + 1000}-{last}" in ranges[1:]


@pytest.mark.parametrize("status", [503, 500])
async def test_a_busy_store_is_asked_again(
    s3: Store, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A store that answers a ranged GET 503 (SlowDown) or 500 a few times is asked again,
    with backoff, and the load completes bit-identical."""
    target = "sharded/model-00001-of-00003.safetensors"
    faults = Faults(target=target, status=status)
    await _load_faulted_once_planned(s3, monkeypatch, faults, answers=RESUMES - 1)
    assert RESUMES - 1 == faults.answered


async def test_access_denied_to_tensor_bytes_names_the_object_and_releases_everything(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 to a presigned GET (a policy that allows the header reads but not this) is
    asked once more through obstore, whose requests carry what store settings add (such as
    requester-pays), and the load reads through obstore from then on; refused again, a range
    is not retried: ``SourceError`` "access denied" naming the object, and the simulated GPU
    holds nothing."""
    target = "sharded/model-00003-of-00003.safetensors"
    faults = Faults(target=target, status=403)
    url, stop = start_proxy(s3.endpoint, faults)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)

    def deny_once_planned(event: Event) -> None:
        if isinstance(event, PlanComputed):
            faults.answers = -1
            faults.seen.clear()

    try:
        with pytest.raises(streamload.SourceError, match="access denied") as raised:
            await streamload.load(
                f"s3://{BUCKET}/sharded",
                params([gpu, "cpu"], chunk_bytes=2**16, staging_bytes=2**18),
                on_event=deny_once_planned,
            )
    finally:
        stop()
    assert f"s3://{BUCKET}/{target}" in str(raised.value)
    asked = [(_signed(path), r) for _, path, r in faults.seen if target in path and r]
    presigned = [r for signed, r in asked if signed]
    by_obstore = [r for signed, r in asked if not signed]
    assert presigned
    assert by_obstore
    assert len(by_obstore) == len(set(by_obstore))  # not retried
    assert set(presigned) <= set(by_obstore)  # each refused presigned range asked once more
    assert 0 == gpu.allocated_bytes


def test_presigned_gets_are_used_for_s3_without_a_proxy_only(
    s3: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule that picks the transport: presigned GETs for S3; obstore's GETs for GCS and
    Azure (their signing is not exercised here) and where a proxy is configured for the
    endpoint (``http.client`` does not speak to proxies), unless ``no_proxy`` exempts it."""
    base = f"s3://{BUCKET}/sharded"
    store = _store(base, {}, 30.0)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    assert SignedRanges.for_store(base, store, 30.0) is not None
    assert SignedRanges.for_store("gs://bucket/m", store, 30.0) is None
    assert SignedRanges.for_store("az://container/m", store, 30.0) is None
    for variable in ("http_proxy", "all_proxy"):
        monkeypatch.setenv(variable, "http://proxy.invalid:3128")
        assert SignedRanges.for_store(base, store, 30.0) is None
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert SignedRanges.for_store(base, store, 30.0) is not None
        monkeypatch.delenv(variable)
        monkeypatch.delenv("no_proxy")


async def test_an_object_overwritten_mid_load_is_an_error(s3: Store) -> None:
    """Once planned, a shard replaced by other bytes fails its next ranged GET (If-Match on
    the listed ETag): ``ObjectChangedError`` naming it; nothing stays allocated."""
    local = s3.local["sharded"]
    upload(s3.client, BUCKET, "changing", local)
    victim = "changing/model-00003-of-00003.safetensors"
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)

    def overwrite(event: Event) -> None:
        if isinstance(event, PlanComputed):
            body = (local / "model-00003-of-00003.safetensors").read_bytes()[::-1]
            s3.client.put_object(Bucket=BUCKET, Key=victim, Body=body)

    with pytest.raises(streamload.ObjectChangedError, match=victim):
        await streamload.load(f"s3://{BUCKET}/changing", params([gpu, "cpu"]), on_event=overwrite)
    assert 0 == gpu.allocated_bytes


async def test_cancelling_an_s3_load_releases_everything(s3: Store) -> None:
    """Cancellation mid-stream: the load's tensors are released and the cancellation goes on."""
    gpu = SimulatedGPU("sim:0", total_bytes=2**30)
    with anyio.move_on_after(30) as scope:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await streamload.load(
                    f"s3://{BUCKET}/sharded", params([gpu, "cpu"]), on_event=cancel
                )

            def cancel(event: Event) -> None:
                if isinstance(event, LayerPlaced):
                    group.cancel_scope.cancel()

            group.start_soon(run)
    assert not scope.cancelled_caught
    assert 0 == gpu.allocated_bytes


def test_the_command_line_plans_an_s3_prefix(s3: Store, capsys: pytest.CaptureFixture[str]) -> None:
    from streamload.cli import main

    assert 0 == main(["plan", f"s3://{BUCKET}/sharded", "--device", "sim:0=1GiB", "--json"])
    assert f"s3://{BUCKET}/sharded" in capsys.readouterr().out


def test_no_partial_files_are_left_in_the_hub_cache(hub: tuple[Path, Path]) -> None:
    """After a failed resolution nothing but the cache's own files is there."""
    _, cache = hub
    before = sorted(files_under(cache))
    with pytest.raises(streamload.SourceError):
        streamload.inspect("tiny-org/absent")
    assert before == sorted(files_under(cache))


async def test_verify_holds_with_dtype_conversion_on_every_path(hub: tuple[Path, Path]) -> None:
    """Converted tensors are read into conversion buffers, which later units reuse: chunks
    that wait for their turn in the hash are copied, so ``verify`` passes on the CPU, a staged
    and an unstaged simulated GPU alike."""
    local, _ = hub
    for device in ("cpu", SimulatedGPU("s", 2**30), SimulatedGPU("u", 2**30, staged=False)):
        model = await streamload.load(REPO, params([device], dtype="bf16", verify=True))
        assert_identical(model.tensors, reference(local), torch.bfloat16)
        assert () == model.report.unverified
        model.release()
