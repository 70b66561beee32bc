"""Quick rollback with the restore point on a repository agent (repo://): the target is
compared in the core and only the blocks that differ are pulled from the agent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmrestore.restore_disk import restore_disk

MIB = 1 << 20


def test_quick_rollback_from_agent_fetches_only_differing_blocks(sample, agent_factory,
                                                                  token_file,
                                                                  tmp_path: Path) -> None:
    bk, disk = sample
    agent = agent_factory(bk.parent)
    data = disk.read_bytes()
    target = tmp_path / "t.img"
    drifted = bytearray(data)
    rng = np.random.default_rng(3)
    blocks = sorted(int(b) for b in rng.choice(len(data) // MIB, 3, replace=False))
    for b in blocks:
        drifted[b * MIB + 100:b * MIB + 4196] = rng.integers(0, 256, 4096,
                                                             dtype=np.uint8).tobytes()
    target.write_bytes(bytes(drifted))
    res = restore_disk(agent.url(), 0, str(target), compare=True, token_file=str(token_file))
    assert target.read_bytes() == data
    assert res.differing_entries == len(blocks)
    assert res.compared_entries == len(data) // MIB
    assert res.bytes_written + res.bytes_zeroed == len(blocks) * MIB
    # at most the differing blocks' stored extents crossed the network
    assert 0 < res.stored_bytes <= len(blocks) * MIB


def test_quick_rollback_from_agent_needs_an_existing_target(sample, agent_factory, token_file,
                                                            tmp_path: Path) -> None:
    import pytest

    from vmrestore.errors import TargetError

    bk, _disk = sample
    agent = agent_factory(bk.parent)
    with pytest.raises(TargetError, match="does not exist"):
        restore_disk(agent.url(), 0, str(tmp_path / "none.img"), compare=True,
                     token_file=str(token_file))
    assert not (tmp_path / "none.img").exists()
