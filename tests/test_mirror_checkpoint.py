"""The mirror's checkpoint against a source that was reset, replaced or
restored from a backup behind the same URL, with other --repositories
patterns, and at a path that cannot be written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.images import make_image
from tests.nats import wait_until
from tests.server import ServeProcess, push_image, serve_cairn, start_serve
from tests.test_mirror import (
    WAIT,
    head_position,
    list_tags,
    log_events,
    manifest_status,
    needs_skopeo,
    run_mirror_status,
    start_mirror,
)


def push_images(url: str, repository: str, count: int) -> None:
    with httpx.Client(base_url=url) as client:
        for number in range(count):
            push_image(client, repository, make_image(), f"v{number}")


def saved_checkpoint(path: Path) -> dict[str, object]:
    """Return the checkpoint without its updated_at time, which every start
    of the mirror rewrites."""
    document = json.loads(path.read_text())
    del document["updated_at"]
    return dict(document)


def registry_id(url: str) -> str:
    return str(httpx.get(f"{url}/_cairn/registry").json()["registry_id"])


@pytest.fixture
def replaceable(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """A list with one source, to which a test appends the servers that
    replace it behind the same URL. Every one is stopped at the end."""
    servers = [serve_cairn(tmp_path / "source-0")]
    try:
        yield servers
    finally:
        for served in servers:
            served.kill()


def replace_source(tmp_path: Path, servers: list[ServeProcess]) -> ServeProcess:
    """Stop the newest source and serve a new, empty one on its port."""
    old = servers[-1]
    old.kill()
    port = old.url.rsplit(":", 1)[1]
    directory = tmp_path / f"source-{len(servers)}"
    new = serve_cairn(directory, "--listen", f"127.0.0.1:{port}")
    servers.append(new)
    assert new.url == old.url
    return new


def mirror_once(
    source_url: str, target_url: str, checkpoint: Path
) -> subprocess.CompletedProcess[str]:
    result = run_mirror_status(source_url, target_url, "--checkpoint", str(checkpoint))
    assert "Traceback" not in result.stderr
    return result


@needs_skopeo
def test_mirror_rejects_replaced_source(
    tmp_path: Path,
    replaceable: list[ServeProcess],
    target: ServeProcess,
) -> None:
    old = replaceable[0]
    push_images(old.url, "library/old", 3)
    checkpoint = tmp_path / "checkpoint.json"
    result = mirror_once(old.url, target.url, checkpoint)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = saved_checkpoint(checkpoint)
    old_id = registry_id(old.url)
    assert saved["source_registry_id"] == old_id

    # A new source behind the same URL, first with fewer events than the
    # checkpoint's position, then with more.
    new = replace_source(tmp_path, replaceable)
    new_id = registry_id(new.url)
    push_images(new.url, "library/new", 1)
    assert head_position(new.url) < saved["position"]

    result = mirror_once(new.url, target.url, checkpoint)

    assert result.returncode == 2, result.stderr[-4000:]
    assert f"reports registry id {new_id}" in result.stderr
    assert f"was written for registry id {old_id}" in result.stderr
    assert f"remove {checkpoint}" in result.stderr
    assert saved_checkpoint(checkpoint) == saved
    assert manifest_status(target.url, "library/new", "v0") == 404

    push_images(new.url, "library/new", 5)
    assert head_position(new.url) > saved["position"]

    result = mirror_once(new.url, target.url, checkpoint)

    assert result.returncode == 2, result.stderr[-4000:]
    assert f"reports registry id {new_id}" in result.stderr
    assert saved_checkpoint(checkpoint) == saved
    assert manifest_status(target.url, "library/new", "v0") == 404

    # A new checkpoint replays the new source from its first event.
    fresh = tmp_path / "fresh.json"
    result = mirror_once(new.url, target.url, fresh)

    assert result.returncode == 0, result.stderr[-4000:]
    assert list_tags(target.url, "library/new") == [f"v{n}" for n in range(5)]
    assert json.loads(fresh.read_text())["source_registry_id"] == new_id


def restart_source(directory: Path, port: str) -> ServeProcess:
    """Serve the source that serve_cairn made in ``directory`` on ``port``."""
    return start_serve(
        directory / "data",
        f"sqlite:///{directory / 'cairn.db'}",
        directory / "serve.log",
        "--listen",
        f"127.0.0.1:{port}",
    )


def test_mirror_rejects_source_restored_from_backup(
    tmp_path: Path, replaceable: list[ServeProcess], target: ServeProcess
) -> None:
    """The hash of the event at the checkpoint's position reveals a restored
    source whose head has passed that position again."""
    directory, backup = tmp_path / "source-0", tmp_path / "backup"
    port = replaceable[0].url.rsplit(":", 1)[1]
    push_images(replaceable[0].url, "library/kept", 1)
    replaceable[0].stop()
    shutil.copytree(directory, backup)
    replaceable.append(restart_source(directory, port))
    push_images(replaceable[-1].url, "library/lost", 1)
    checkpoint = tmp_path / "checkpoint.json"
    result = mirror_once(replaceable[-1].url, target.url, checkpoint)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = saved_checkpoint(checkpoint)

    replaceable[-1].stop()
    shutil.rmtree(directory)
    shutil.copytree(backup, directory)
    source = restart_source(directory, port)
    replaceable.append(source)
    push_images(source.url, "library/new", 3)
    assert head_position(source.url) > int(str(saved["position"]))

    result = mirror_once(source.url, target.url, checkpoint)

    assert result.returncode == 2, result.stderr[-4000:]
    [failed] = [
        line
        for line in log_events(result.stderr)
        if line["event"] == "mirror_source_replaced"
    ]
    assert f"at position {saved['position']} has hash" in failed["error"]
    assert f"whose hash is {saved['position_hash']}" in failed["error"]
    assert f"remove {checkpoint}" in failed["error"]
    assert saved_checkpoint(checkpoint) == saved
    assert manifest_status(target.url, "library/new", "v0") == 404


def replays(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [
        line
        for line in log_events(result.stderr)
        if line["event"] == "mirror_replaying_from_start"
    ]


def test_mirror_replays_for_new_repositories(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    """Other --repositories patterns on the same checkpoint replay the source,
    because the events they add lie before the checkpoint's position. The
    same patterns repeated or reordered do not."""
    push_images(source.url, "library/app", 1)
    push_images(source.url, "team/tool", 1)
    checkpoint = tmp_path / "checkpoint.json"
    options = ["--checkpoint", str(checkpoint)]
    narrow = run_mirror_status(
        source.url, target.url, *options, "--repositories", "library/*", "team/x"
    )
    assert narrow.returncode == 0, narrow.stderr[-4000:]
    assert manifest_status(target.url, "team/tool", "v0") == 404
    saved = json.loads(checkpoint.read_text())
    assert saved["repositories"] == ["library/*", "team/x"]
    assert saved["propagate_deletes"] is False

    same = run_mirror_status(
        source.url,
        target.url,
        *options,
        "--repositories",
        "team/x",
        "library/*",
        "team/x",
    )

    assert same.returncode == 0, same.stderr[-4000:]
    assert replays(same) == []

    wide = mirror_once(source.url, target.url, checkpoint)

    assert wide.returncode == 0, wide.stderr[-4000:]
    assert manifest_status(target.url, "team/tool", "v0") == 200
    [replay] = replays(wide)
    assert replay["level"] == "warning"
    assert "from ['library/*', 'team/x'] to []" in str(replay["reason"])
    saved = json.loads(checkpoint.read_text())
    assert saved["repositories"] == []
    assert saved["position"] == head_position(source.url)


def test_mirror_replays_to_propagate_deletes(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    """Deletes that earlier runs passed over are copied once a run
    propagates deletes."""
    push_images(source.url, "library/app", 2)
    checkpoint = tmp_path / "checkpoint.json"
    first = mirror_once(source.url, target.url, checkpoint)
    assert first.returncode == 0, first.stderr[-4000:]
    response = httpx.delete(f"{source.url}/v2/library/app/manifests/v0")
    assert response.status_code == 202, response.text
    undeleted = mirror_once(source.url, target.url, checkpoint)
    assert undeleted.returncode == 0, undeleted.stderr[-4000:]
    assert manifest_status(target.url, "library/app", "v0") == 200

    deleting = run_mirror_status(
        source.url, target.url, "--checkpoint", str(checkpoint), "--propagate-deletes"
    )

    assert deleting.returncode == 0, deleting.stderr[-4000:]
    assert manifest_status(target.url, "library/app", "v0") == 404
    assert manifest_status(target.url, "library/app", "v1") == 200
    [replay] = replays(deleting)
    assert "--propagate-deletes is on" in str(replay["reason"])
    assert json.loads(checkpoint.read_text())["propagate_deletes"] is True


def test_mirror_replays_older_checkpoint(
    tmp_path: Path, source: ServeProcess, target: ServeProcess
) -> None:
    """A checkpoint that does not say what its runs left out replays once."""
    push_images(source.url, "library/app", 1)
    push_images(source.url, "team/tool", 1)
    head = head_position(source.url)
    checkpoint = tmp_path / "checkpoint.json"
    # What an older mirror wrote after a run with --repositories 'library/*'.
    checkpoint.write_text(
        json.dumps({"source": source.url, "target": target.url, "position": head})
    )

    result = mirror_once(source.url, target.url, checkpoint)

    assert result.returncode == 0, result.stderr[-4000:]
    [replay] = replays(result)
    assert "does not record" in str(replay["reason"])
    assert manifest_status(target.url, "team/tool", "v0") == 200
    assert manifest_status(target.url, "library/app", "v0") == 200
    again = mirror_once(source.url, target.url, checkpoint)
    assert again.returncode == 0, again.stderr[-4000:]
    assert replays(again) == []


def test_mirror_rejects_position_beyond_head(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    head = head_position(source.url)
    # An older mirror's checkpoint, without a registry id, further along
    # than the source's log: a source restored from an older backup.
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(
        json.dumps({"source": source.url, "target": target.url, "position": 1000})
    )

    result = mirror_once(source.url, target.url, checkpoint)

    assert result.returncode == 2, result.stderr[-4000:]
    failed = [
        line
        for line in log_events(result.stderr)
        if line["event"] == "mirror_source_replaced"
    ]
    assert len(failed) == 1
    assert (
        f"ends at position {head}, before the mirror's position 1000"
        in (failed[0]["error"])
    )
    assert f"remove {checkpoint}" in failed[0]["error"]
    saved = json.loads(checkpoint.read_text())
    assert saved["position"] == 1000
    # The id is recorded only once the head matched, or a rerun would take
    # the replaced source as the checkpoint's own.
    assert saved["source_registry_id"] is None
    assert manifest_status(target.url, "library/app", "v0") == 404


def test_mirror_records_id_in_older_checkpoint(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 2)
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_text(
        json.dumps({"source": source.url, "target": target.url, "position": 0})
    )

    result = mirror_once(source.url, target.url, checkpoint)

    assert result.returncode == 0, result.stderr[-4000:]
    saved = json.loads(checkpoint.read_text())
    assert saved["source_registry_id"] == registry_id(source.url)
    assert saved["position"] == head_position(source.url)
    assert manifest_status(target.url, "library/app", "v1") == 200


def test_mirror_following_stops_on_reset(
    tmp_path: Path,
    replaceable: list[ServeProcess],
    target: ServeProcess,
) -> None:
    old = replaceable[0]
    push_images(old.url, "library/app", 3)
    log_path = tmp_path / "mirror.log"
    mirror = start_mirror(old.url, target.url, log_path, "--poll-interval", "0.1")
    try:
        wait_until(
            lambda: manifest_status(target.url, "library/app", "v2") == 200, WAIT
        )
        # More events than the mirror's position, so that only the registry
        # id tells the new source from the old one.
        old_head = head_position(old.url)
        new = replace_source(tmp_path, replaceable)
        push_images(new.url, "library/other", 5)
        assert head_position(new.url) > old_head

        status = mirror.wait(WAIT)
    finally:
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait(10)

    assert status == 2
    lines = log_events(log_path.read_text())
    failed = [line for line in lines if line["event"] == "mirror_source_replaced"]
    assert len(failed) == 1
    assert f"reports registry id {registry_id(new.url)}" in failed[0]["error"]
    assert "the mirror started on registry id" in failed[0]["error"]
    assert "Start the mirror again" in failed[0]["error"]
    assert manifest_status(target.url, "library/other", "v0") == 404


def test_mirror_rejects_unwritable_checkpoint(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    checkpoint = tmp_path / "missing" / "checkpoint.json"

    result = mirror_once(source.url, target.url, checkpoint)

    assert result.returncode == 2, result.stderr[-4000:]
    assert f"cannot write checkpoint {checkpoint}: " in result.stderr
    assert not [line for line in log_events(result.stderr) if "event" in line]
    assert manifest_status(target.url, "library/app", "v0") == 404
    assert not checkpoint.parent.exists()


def start_polling_mirror(
    source_url: str, target_url: str, checkpoint: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a mirror that polls every 0.1 s and saves to ``checkpoint``."""
    return start_mirror(
        source_url,
        target_url,
        log_path,
        "--poll-interval",
        "0.1",
        "--checkpoint",
        str(checkpoint),
    )


def wait_for_checkpoint_at_head(checkpoint: Path, source_url: str) -> None:
    """Wait until ``checkpoint`` records the source's head. From then on a
    mirror polls without writing it."""
    head = head_position(source_url)
    wait_until(
        lambda: (
            checkpoint.exists() and saved_checkpoint(checkpoint)["position"] == head
        ),
        WAIT,
    )


def test_second_mirror_on_checkpoint_rejected(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    checkpoint = tmp_path / "checkpoint.json"
    log_path = tmp_path / "mirror.log"
    first = start_polling_mirror(source.url, target.url, checkpoint, log_path)
    try:
        # Its bytes stay the same from then on unless the second mirror writes.
        wait_for_checkpoint_at_head(checkpoint, source.url)
        saved = checkpoint.read_bytes()

        second = mirror_once(source.url, target.url, checkpoint)
        after_second = checkpoint.read_bytes()
        still_running = first.poll() is None
    finally:
        first.terminate()
        first.wait(30)
    after = mirror_once(source.url, target.url, checkpoint)

    assert second.returncode == 2, second.stderr[-4000:]
    assert second.stderr.strip() == (
        f"cairn mirror: checkpoint {checkpoint} is in use by another cairn "
        f"mirror (it holds the lock on {tmp_path / '.checkpoint.json.lock'}); "
        "run one mirror per checkpoint"
    )
    assert after_second == saved
    assert still_running
    assert after.returncode == 0, after.stderr[-4000:]


def test_mirror_stops_when_checkpoint_unwritable(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    directory = tmp_path / "state"
    directory.mkdir()
    checkpoint = directory / "checkpoint.json"
    log_path = tmp_path / "mirror.log"
    mirror = start_polling_mirror(source.url, target.url, checkpoint, log_path)
    try:
        # The directory can then go without a race.
        wait_for_checkpoint_at_head(checkpoint, source.url)
        checkpoint.unlink()
        (directory / ".checkpoint.json.lock").unlink()
        directory.rmdir()
        with httpx.Client(base_url=source.url) as client:
            push_image(client, "library/app", make_image(), "later")

        status = mirror.wait(WAIT)
    finally:
        if mirror.poll() is None:
            mirror.kill()
            mirror.wait(10)

    assert status == 1
    text = log_path.read_text()
    assert "Traceback" not in text
    failed = [line for line in log_events(text) if line["event"] == "mirror_failed"]
    assert len(failed) == 1
    assert f"cannot write checkpoint {checkpoint}: " in failed[0]["error"]


def test_linked_checkpoint_shares_lock(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    checkpoint = tmp_path / "a" / "mirror.json"
    link = tmp_path / "b" / "cp.json"
    link.symlink_to(checkpoint)
    first = start_polling_mirror(
        source.url, target.url, checkpoint, tmp_path / "mirror.log"
    )
    try:
        wait_until(
            lambda: manifest_status(target.url, "library/app", "v0") == 200, WAIT
        )
        second = mirror_once(source.url, target.url, link)
    finally:
        first.terminate()
        first.wait(30)
    push_images(source.url, "library/other", 1)
    after = mirror_once(source.url, target.url, link)

    assert second.returncode == 2, second.stderr[-4000:]
    assert second.stderr.strip() == (
        f"cairn mirror: checkpoint {link} is in use by another cairn mirror (it "
        f"holds the lock on {tmp_path / 'a' / '.mirror.json.lock'}); run one "
        "mirror per checkpoint"
    )
    assert not (tmp_path / "b" / ".cp.json.lock").exists()
    assert after.returncode == 0, after.stderr[-4000:]
    assert link.is_symlink()
    assert link.readlink() == checkpoint
    assert saved_checkpoint(checkpoint)["position"] == head_position(source.url)
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == ["cp.json"]


def test_mirror_creates_checkpoint_through_link(
    tmp_path: Path,
    source: ServeProcess,
    target: ServeProcess,
) -> None:
    push_images(source.url, "library/app", 1)
    checkpoint = tmp_path / "state" / "mirror.json"
    checkpoint.parent.mkdir()
    link = tmp_path / "cp.json"
    link.symlink_to(checkpoint)

    result = mirror_once(source.url, target.url, link)

    assert result.returncode == 0, result.stderr[-4000:]
    assert link.is_symlink()
    assert saved_checkpoint(checkpoint)["position"] == head_position(source.url)
    assert (tmp_path / "state" / ".mirror.json.lock").exists()
    assert not (tmp_path / ".cp.json.lock").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo"])
def test_special_checkpoint_rejected(tmp_path: Path, kind: str) -> None:
    checkpoint = tmp_path / "cp.json"
    special = tmp_path / "special"
    if kind == "directory":
        checkpoint.mkdir()
        expected = f"checkpoint {checkpoint} is a directory"
    elif kind == "fifo":
        os.mkfifo(checkpoint)
        expected = f"checkpoint {checkpoint} is a FIFO"
    else:
        os.mkfifo(special)
        checkpoint.symlink_to(special)
        expected = f"checkpoint {checkpoint} is a FIFO"
    before = sorted(path.name for path in tmp_path.iterdir())

    result = run_mirror_status(
        "http://127.0.0.1:1", "http://127.0.0.1:2", "--checkpoint", str(checkpoint)
    )

    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr == (
        f"cairn mirror: {expected}, not a regular file. Pass the path of a "
        "checkpoint file, or of one to create, as --checkpoint\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_device_checkpoint_rejected() -> None:
    lock = Path("/dev/.null.lock")
    existed = lock.exists()

    result = run_mirror_status(
        "http://127.0.0.1:1", "http://127.0.0.1:2", "--checkpoint", "/dev/null"
    )

    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr == (
        "cairn mirror: checkpoint /dev/null is a character device, not a regular "
        "file. Pass the path of a checkpoint file, or of one to create, as "
        "--checkpoint\n"
    )
    assert lock.exists() == existed


def test_checkpoint_link_loop_rejected(tmp_path: Path) -> None:
    checkpoint = tmp_path / "cp.json"
    checkpoint.symlink_to(tmp_path / "other.json")
    (tmp_path / "other.json").symlink_to(checkpoint)

    result = run_mirror_status(
        "http://127.0.0.1:1", "http://127.0.0.1:2", "--checkpoint", str(checkpoint)
    )

    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr == (
        f"cairn mirror: cannot read checkpoint {checkpoint}: it is a loop of "
        "symbolic links\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "cp.json",
        "other.json",
    ]
