"""CommStats counts the bytes each collective sends with the documented convention, exactly, and
puts torch.distributed back as it was.

The two-process part runs this file as a torchrun worker (gloo, a subprocess with a timeout):
plain `dist.*` collectives and p2p, DTensor redistributes (functional collectives) and an FSDP2
forward/backward, each measured alone; the audit mode must see nothing bypass the wrappers, and a
ProcessGroup method called directly must show up in `missed`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmkit.tools.commstats import CommStats

REPO = Path(__file__).resolve().parents[3]
PORTS = range(29780, 29790)  # this test's range; the first free one is used


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {PORTS}")


def _originals() -> dict:
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed import distributed_c10d as c10d

    return {
        "dist.all_reduce": dist.all_reduce,
        "c10d.all_reduce": c10d.all_reduce,
        "dist.isend": dist.isend,
        "c10d.isend": c10d.isend,
        "dist.batch_isend_irecv": dist.batch_isend_irecv,
        "funcol.all_gather_single": funcol.all_gather_single,
        "funcol.reduce_scatter_single": funcol.reduce_scatter_single,
    }


def test_install_wraps_and_restores():
    before = _originals()
    with CommStats() as cs:
        during = _originals()
        assert all(during[k] is not before[k] for k in before), "every entry point is wrapped"
        assert during["dist.all_reduce"] is during["c10d.all_reduce"]  # the same wrapper everywhere
        assert "torch.distributed._functional_collectives.all_gather_single" in cs.wrapped
        try:
            CommStats().install()
            raise AssertionError("a second install must raise")
        except RuntimeError as e:
            assert "another instance" in str(e)
    after = _originals()
    assert all(after[k] is before[k] for k in before)
    assert cs.wrapped == []


def test_delta():
    a = {"bytes": {"p2p": 8, "all_reduce": 4}, "calls": {"p2p": 1, "all_reduce": 1}}
    b = {"bytes": {"p2p": 24, "all_reduce": 4, "all_gather": 6}, "calls": {"p2p": 3, "all_reduce": 1}}
    assert CommStats.delta(a, b) == {"bytes": {"all_gather": 6, "p2p": 16}, "calls": {"p2p": 2}}


def test_two_processes_exact_bytes(tmp_path):
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           __file__, str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    both = {
        "all_reduce": {"all_reduce": 40},  # 10 fp32 = 40 B, x 2(n-1)/n = 1
        "all_gather_into_tensor": {
            "all_gather": 24
        },  # (n-1) x 6 fp32, counted once (it calls all_gather_single)
        "all_gather_list": {"all_gather": 12},
        "reduce_scatter_single": {"reduce_scatter": 16},  # (n-1)/n x 8 fp32
        "all_to_all_single": {"all_to_all": 16},  # the half of 8 fp32 that leaves the rank
        "broadcast": {"broadcast": 40},  # 5 fp64, factor 1
        "batch_isend_irecv": {"p2p": 28},  # 7 int32 sent, the receive counts 0
        "dtensor_shard_to_replicate": {"all_gather": 16},  # local (2, 2) fp32 all-gathered
        "dtensor_partial_to_replicate": {"all_reduce": 12},
        "dtensor_partial_to_shard": {"reduce_scatter": 8},
    }
    for name, want in both.items():
        assert r0[name]["bytes"] == want, (name, r0[name])
        assert r1[name]["bytes"] == want, (name, r1[name])
    assert r0["all_gather_into_tensor"]["calls"] == {"all_gather": 1}
    assert r0["batch_isend_irecv"]["calls"] == {"p2p": 1}
    # uneven all-to-all: rank 0 sends 3 rows of 16 B to rank 1, rank 1 sends 1 row
    assert r0["all_to_all_uneven"]["bytes"] == {"all_to_all": 48}
    assert r1["all_to_all_uneven"]["bytes"] == {"all_to_all": 16}
    # blocking send from rank 0 only
    assert r0["send_recv"]["bytes"] == {"p2p": 12} and r1["send_recv"]["bytes"] == {}
    assert r1["send_recv"]["calls"] == {"recv": 1}
    # FSDP2 of a 4x4 Linear: each all-gather sends this rank's 8 fp32, each reduce-scatter half of 16 fp32
    for r in (r0, r1):
        fs = r["fsdp2"]
        assert fs["calls"]["all_gather"] >= 1 and fs["calls"]["reduce_scatter"] >= 1, fs
        assert fs["bytes"] == {"all_gather": 32 * fs["calls"]["all_gather"],
                               "reduce_scatter": 32 * fs["calls"]["reduce_scatter"]}, fs  # fmt: skip
        assert r["missed"] == {}, r["missed"]  # the audit saw nothing bypass the wrappers
        assert r["bypass"] == {"c10d.allreduce_": 1}, r["bypass"]  # ...and does see a direct PG call
        assert r["after_exit"] == r["before_exit"]  # nothing counted once uninstalled


def _worker(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    dist.init_process_group("gloo")
    r = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    res: dict = {}
    with CommStats(audit=True) as cs:

        def measure(name, fn):
            before = cs.snapshot()
            fn()
            res[name] = CommStats.delta(before, cs.snapshot())

        measure("all_reduce", lambda: dist.all_reduce(torch.ones(10)))
        measure("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(torch.empty(12), torch.ones(6)))
        measure("all_gather_list", lambda: dist.all_gather([torch.empty(3), torch.empty(3)], torch.ones(3)))
        measure("reduce_scatter_single", lambda: dist.reduce_scatter_single(torch.empty(4), torch.ones(8)))
        measure("all_to_all_single", lambda: dist.all_to_all_single(torch.empty(8), torch.ones(8)))
        rows_in, rows_out = ([2, 3], [2, 1]) if r == 0 else ([1, 2], [3, 2])  # rows of 4 fp32
        measure(
            "all_to_all_uneven",
            lambda: dist.all_to_all_single(
                torch.empty(sum(rows_out), 4), torch.ones(sum(rows_in), 4), rows_out, rows_in
            ),
        )
        measure("broadcast", lambda: dist.broadcast(torch.ones(5, dtype=torch.float64), src=0))

        def ring():
            recv = torch.empty(7, dtype=torch.int32)
            ops = [dist.P2POp(dist.isend, torch.ones(7, dtype=torch.int32), 1 - r),
                   dist.P2POp(dist.irecv, recv, 1 - r)]  # fmt: skip
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        measure("batch_isend_irecv", ring)
        measure("send_recv", lambda: dist.send(torch.ones(3), 1) if r == 0 else dist.recv(torch.empty(3), 0))

        local = torch.arange(4.0).reshape(2, 2) + r
        measure(
            "dtensor_shard_to_replicate",
            lambda: float(DTensor.from_local(local, mesh, [Shard(0)]).full_tensor().sum()),  # waits
        )
        part = lambda n: DTensor.from_local(torch.ones(n), mesh, [Partial()])  # noqa: E731
        # float(...sum()) waits for the async collective: an unwaited one can abort gloo at exit
        measure(
            "dtensor_partial_to_replicate",
            lambda: float(part(3).redistribute(mesh, [Replicate()]).to_local().sum()),
        )
        measure(
            "dtensor_partial_to_shard", lambda: float(part(4).redistribute(mesh, [Shard(0)]).to_local().sum())
        )

        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4, bias=False)
        fully_shard(lin, mesh=mesh)
        lin.set_gradient_divide_factor(1.0)
        lin.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        measure("fsdp2", lambda: lin(torch.ones(2, 4)).sum().backward())
        res["missed"] = dict(cs.missed)

        pg = dist.group.WORLD
        pg.allreduce([torch.ones(2)]).wait()  # bypasses torch.distributed's Python functions
        res["bypass"] = dict(cs.missed)
    res["before_exit"] = cs.snapshot()
    dist.all_reduce(torch.ones(4))
    res["after_exit"] = cs.snapshot()
    (out / f"rank{r}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # results are written; skip interpreter teardown (gloo threads can abort it under load)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
