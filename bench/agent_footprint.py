"""Memory and CPU footprint of the device agent, against the model's own session.

Every figure is measured in a fresh child process (``python`` started anew, so
nothing of this script or of the server is in it), from ``/proc/self/status``
(``VmRSS``: resident now, ``VmHWM``: peak resident) and ``time.process_time()``
(CPU of all the process's threads). Two measurements, each with a reference
child run in the same invocation:

* **idle**: a real server (on loopback, in this process) enrolls a device and
  deploys the small ``digits_v1`` sample. The child builds an
  :class:`~edgeota.agent.runner.Agent` from the enrolled ``agent.toml`` (HTTP
  transport), ``start()``\\ s it, installs v1 with one update cycle, commits it,
  then runs as ``edgeota-agent run`` does: the local inference endpoint
  (uvicorn) up and ``run_forever`` polling (the poll interval is longer than
  the window, so the window sees only its once-a-second probation check).
  After a settle pause it measures RSS and CPU over an idle window. The
  **reference** child imports only onnxruntime and numpy, creates an
  ``InferenceSession`` of the same model file with the same options, runs one
  inference and idles for the same window. RSS agent - reference is the
  agent's overhead beyond serving the model; the target is tens of MiB
  (below :data:`IDLE_OVERHEAD_TARGET_MIB`). CPU is reported as CPU seconds
  per minute of idling.
* **install**: a synthetic ONNX model of ``--size-mib`` of float32 weights (one
  ``MatMul`` by a random ``[8192, N]`` initializer, stored inline) is sealed
  with ``seal_bundle``. The child runs what a device does with a downloaded
  bundle: ``open_bundle`` (verify, decrypt, untar, fsync), then
  ``create_session`` with the production settings and one inference; its peak
  RSS is compared to the **reference** child, which only creates the session
  from the plaintext model file and runs one inference. Install peak -
  session peak is what installing costs beyond loading the model (also shown
  as a ratio). ``open_bundle`` streams, so that extra should be a fixed few
  MiB (its imports and chunk buffers) whatever the model size: the target is
  at most :data:`INSTALL_EXTRA_TARGET_MIB`.

MiB = 2**20 bytes. Writing or reading the model files with ``write``/``read``
does not count (page cache is not the process's RSS); pages of a file the
process *maps* do count while resident, which matters for models with
external data (mapped, see ``create_session``), not for this bench's model,
whose weights are inline.

Usage::

    python bench/agent_footprint.py [--size-mib 256] [--idle-s 5] [--quick] [--json]

``--quick`` uses a 32 MiB model and a 2 s window. Exits 0 whatever the
result: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import proc_status

IDLE_OVERHEAD_TARGET_MIB = 100.0  # "tens of MiB"
INSTALL_EXTRA_TARGET_MIB = 32.0  # must not grow with the model
SETTLE_S = 1.5  # after the last start-up work, before the idle window opens
INNER_DIM = 8192  # rows of the MatMul weight; columns follow from the size
_KIB = 1024
_MIB = 1024 * 1024
_CHILD_TIMEOUT_S = 300.0

# --------------------------------------------------------------------------- in the children


def _idle_window(seconds: float) -> dict[str, float]:
    """Sleep ``seconds`` (other threads keep running) and report CPU and RSS over it."""
    import gc

    gc.collect()
    time.sleep(SETTLE_S)
    before = proc_status()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    after = proc_status()
    return {
        "rss_start": before["VmRSS"],
        "rss": after["VmRSS"],
        "hwm": after["VmHWM"],
        "threads": after["Threads"],
        "window_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_min": cpu / wall * 60,
    }


def _child_python(_args: list[str]) -> dict[str, object]:
    """Python alone: the floor under both idle figures."""
    return {"rss": proc_status()["VmRSS"]}


def _child_idle_reference(args: list[str]) -> dict[str, object]:
    """Only onnxruntime + numpy and one session of the model, with the agent's options."""
    model, seconds = args[0], float(args[1])
    import numpy as np
    import onnxruntime as ort

    # The production SessionSettings, spelled out so that nothing of edgeota is imported.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(model, sess_options=options,
                                   providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    session.run(None, {spec.name: np.zeros(shape, dtype=np.float32)})
    return _idle_window(seconds)


def _child_idle_agent(args: list[str]) -> dict[str, object]:
    """The agent as ``edgeota-agent run`` runs it, after installing and committing v1."""
    config_path, seconds = Path(args[0]), float(args[1])
    import threading

    from edgeota.agent.config import AgentConfig
    from edgeota.agent.inference_server import InferenceServer
    from edgeota.agent.runner import Agent, AgentSettings, run_forever
    from edgeota.samples import load_test_split

    agent = Agent(AgentConfig.load(config_path),
                  AgentSettings(probation_seconds=0, probation_min_inferences=1),
                  transport="http")
    agent.start()
    outcome = agent.run_cycle()
    if outcome.states != {"digits": "probation"}:
        raise SystemExit(f"install of digits v1 did not reach probation: {outcome}")
    x, _ = load_test_split()
    for row in range(5):
        agent.host.predict("digits", {"input": x[row:row + 1]})
    if agent.check_probation(force=True) != {"digits": "committed"}:
        raise SystemExit("digits v1 was not committed")
    stop = threading.Event()
    with InferenceServer(agent.host, port=0):
        # A poll longer than the window: the idle agent wakes only for probation checks.
        loop = threading.Thread(
            target=run_forever, args=(agent, stop), kwargs={"poll_seconds": 3600.0}, daemon=True
        )
        loop.start()  # its first cycle finds v1 current, then the loop idles
        result = _idle_window(seconds)
        stop.set()
        loop.join(timeout=10)
    result["version"] = agent.host.current_version("digits")
    return result


def _child_install(args: list[str]) -> dict[str, object]:
    """What a device does with a downloaded bundle: open it, load the model, infer once."""
    sealed, key_hex, dest = Path(args[0]), args[1], Path(args[2])
    sealed_sha256, plaintext_sha256 = args[3], args[4]
    import numpy as np

    from edgeota.protocol.bundle import open_bundle
    from edgeota.runtime.validation import SessionSettings, create_session

    imported = proc_status()["VmRSS"]
    start = time.perf_counter()
    opened = open_bundle(sealed, bytes.fromhex(key_hex), dest,
                         expected_sealed_sha256=sealed_sha256,
                         expected_plaintext_sha256=plaintext_sha256)
    open_s = time.perf_counter() - start
    after_open = proc_status()
    start = time.perf_counter()
    session = create_session(opened.model_path, SessionSettings())
    session.run(None, {"input": np.ones((1, INNER_DIM), dtype=np.float32)})
    session_s = time.perf_counter() - start
    done = proc_status()
    return {
        "rss_imported": imported,
        "hwm_after_open": after_open["VmHWM"],
        "rss_after_open": after_open["VmRSS"],
        "hwm": done["VmHWM"],
        "rss": done["VmRSS"],
        "open_s": open_s,
        "session_s": session_s,
    }


def _child_session_reference(args: list[str]) -> dict[str, object]:
    """Only the session of the plaintext model file and one inference."""
    model = Path(args[0])
    import numpy as np

    from edgeota.runtime.validation import SessionSettings, create_session

    imported = proc_status()["VmRSS"]
    start = time.perf_counter()
    session = create_session(model, SessionSettings())
    session.run(None, {"input": np.ones((1, INNER_DIM), dtype=np.float32)})
    session_s = time.perf_counter() - start
    done = proc_status()
    return {"rss_imported": imported, "hwm": done["VmHWM"], "rss": done["VmRSS"],
            "session_s": session_s}


_CHILDREN = {
    "python": _child_python,
    "idle-reference": _child_idle_reference,
    "idle-agent": _child_idle_agent,
    "install": _child_install,
    "session-reference": _child_session_reference,
}


def _run_child(kind: str, *args: object) -> dict[str, object]:
    """Run ``kind`` in a fresh interpreter; its last stdout line is its JSON result."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, *map(str, args)],
        capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"child {kind!r} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- in the parent


def _mib(value: object) -> float:
    return round(float(value) / _MIB, 1)  # type: ignore[arg-type]


def bench_idle(seconds: float, workdir: Path) -> dict[str, object]:
    """A real server, one enrolled device with digits v1 deployed; agent vs bare session."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from server_support import SAMPLES, running_server

    from edgeota.server.home import HomeOptions

    folder = workdir / "idle"
    folder.mkdir()
    with running_server(folder, f"sqlite:///{folder / 'edgeota.db'}",
                        HomeOptions(bin_bits=4)) as server:
        device = server.enroll("pi-1")
        published = server.publish("digits_v1", "1.0.0")
        if published.code != 0:
            raise SystemExit(f"publish failed: {published.err}")
        deployed = server.cli("deploy", "digits@1.0.0", "--devices", "pi-1")
        if deployed.code != 0:
            raise SystemExit(f"deploy failed: {deployed.err}")
        agent = _run_child("idle-agent", device / "agent.toml", seconds)
    reference = _run_child("idle-reference", SAMPLES / "digits_v1.onnx", seconds)
    python = _run_child("python")
    overhead = _mib(agent["rss"]) - _mib(reference["rss"])
    return {
        "model": "digits_v1.onnx",
        "model_bytes": (SAMPLES / "digits_v1.onnx").stat().st_size,
        "idle_s": seconds,
        "agent_version_served": agent["version"],
        "python_rss_mib": _mib(python["rss"]),
        "reference_rss_mib": _mib(reference["rss"]),
        "agent_rss_mib": _mib(agent["rss"]),
        "agent_rss_window_start_mib": _mib(agent["rss_start"]),
        "agent_hwm_mib": _mib(agent["hwm"]),
        "overhead_mib": round(overhead, 1),
        "ratio": round(float(agent["rss"]) / float(reference["rss"]), 2),  # type: ignore[arg-type]
        "target_overhead_mib": IDLE_OVERHEAD_TARGET_MIB,
        "verdict": "PASS" if overhead <= IDLE_OVERHEAD_TARGET_MIB else "ABOVE",
        "agent_threads": agent["threads"],
        "reference_threads": reference["threads"],
        "agent_cpu_s_per_min": round(float(agent["cpu_s_per_min"]), 4),  # type: ignore[arg-type]
        "reference_cpu_s_per_min": round(float(reference["cpu_s_per_min"]), 4),  # type: ignore[arg-type]
    }


def _write_model(path: Path, size_mib: int) -> tuple[int, int]:
    """``output = input @ W`` with W a random float32 [INNER_DIM, N] initializer of size_mib."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    columns = max(1, size_mib * _MIB // (4 * INNER_DIM))
    weights = np.random.default_rng(0).standard_normal((INNER_DIM, columns), dtype=np.float32)
    initializer = helper.make_tensor("W", TensorProto.FLOAT, weights.shape,
                                     weights.tobytes(), raw=True)
    del weights
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])],
        "footprint",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, INNER_DIM])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, columns])],
        [initializer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return INNER_DIM, columns


def bench_install(size_mib: int, workdir: Path) -> dict[str, object]:
    from edgeota.protocol.bundle import describe_payload, generate_content_key, seal_bundle
    from edgeota.protocol.manifest import Manifest, TensorSpec

    folder = workdir / "install"
    folder.mkdir()
    model = folder / "model.onnx"
    start = time.perf_counter()
    rows, columns = _write_model(model, size_mib)
    build_s = time.perf_counter() - start
    manifest = Manifest(
        name="footprint",
        version="1.0.0",
        model=describe_payload(model, "model.onnx"),
        opset=17,
        inputs=(TensorSpec("input", "FP32", (None, rows)),),
        outputs=(TensorSpec("output", "FP32", (None, columns)),),
        hardware=("bench",),
    )
    key = generate_content_key()
    sealed = folder / "bundle.sealed"
    start = time.perf_counter()
    info = seal_bundle(manifest, {"model.onnx": model}, sealed, key)
    seal_s = time.perf_counter() - start

    install = _run_child("install", sealed, key.hex(), folder / "opened",
                         info.sealed_sha256, info.plaintext_sha256)
    reference = _run_child("session-reference", model)
    extra = _mib(install["hwm"]) - _mib(reference["hwm"])
    ratio = float(install["hwm"]) / float(reference["hwm"])  # type: ignore[arg-type]
    return {
        "size_mib": size_mib,
        "model_bytes": manifest.model.size,
        "weight_shape": [rows, columns],
        "sealed_bytes": info.sealed_size,
        "install_peak_mib": _mib(install["hwm"]),
        "install_peak_after_open_mib": _mib(install["hwm_after_open"]),
        "install_imported_rss_mib": _mib(install["rss_imported"]),
        "install_rss_end_mib": _mib(install["rss"]),
        "session_peak_mib": _mib(reference["hwm"]),
        "session_imported_rss_mib": _mib(reference["rss_imported"]),
        "session_rss_end_mib": _mib(reference["rss"]),
        "ratio": round(ratio, 3),
        "extra_mib": round(extra, 1),
        "target_extra_mib": INSTALL_EXTRA_TARGET_MIB,
        "verdict": "PASS" if extra <= INSTALL_EXTRA_TARGET_MIB else "ABOVE",
        "open_s": round(float(install["open_s"]), 2),  # type: ignore[arg-type]
        "install_session_s": round(float(install["session_s"]), 2),  # type: ignore[arg-type]
        "reference_session_s": round(float(reference["session_s"]), 2),  # type: ignore[arg-type]
        "build_s": round(build_s, 2),
        "seal_s": round(seal_s, 2),
    }


def _print_table(idle: dict[str, object], install: dict[str, object], total_s: float) -> None:
    print()
    header = f"{'idle agent (MiB RSS)':<44} {'value':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("python alone", idle["python_rss_mib"]),
        ("reference: onnxruntime+numpy+session", idle["reference_rss_mib"]),
        ("agent idle, serving (HTTP up, loop running)", idle["agent_rss_mib"]),
        ("agent overhead beyond the model", idle["overhead_mib"]),
        ("ratio agent / reference", f"{idle['ratio']:.2f}"),
        (f"target overhead <= {IDLE_OVERHEAD_TARGET_MIB:g} MiB", idle["verdict"]),
        ("agent peak RSS (install of v1 included)", idle["agent_hwm_mib"]),
        ("threads agent / reference",
         f"{idle['agent_threads']} / {idle['reference_threads']}"),
        ("CPU s per idle minute, agent", idle["agent_cpu_s_per_min"]),
        ("CPU s per idle minute, reference", idle["reference_cpu_s_per_min"]),
    ]
    for label, value in rows:
        print(f"{label:<44} {value!s:>10}")
    print()
    header = f"{'install of a ' + str(install['size_mib']) + ' MiB model (MiB)':<44} {'value':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("install peak RSS (open_bundle+session+run)", install["install_peak_mib"]),
        ("  of which peak after open_bundle", install["install_peak_after_open_mib"]),
        ("reference: session-only peak RSS", install["session_peak_mib"]),
        ("extra beyond the session", install["extra_mib"]),
        ("ratio install / session", f"{install['ratio']:.3f}"),
        (f"target extra <= {INSTALL_EXTRA_TARGET_MIB:g} MiB", install["verdict"]),
        ("RSS after imports, install / reference",
         f"{install['install_imported_rss_mib']} / {install['session_imported_rss_mib']}"),
        ("seconds: open_bundle / session+run", f"{install['open_s']} / "
         f"{install['install_session_s']}"),
    ]
    for label, value in rows:
        print(f"{label:<44} {value!s:>10}")
    print()
    print(
        f"idle window {idle['idle_s']:g} s after a {SETTLE_S:g} s settle; model "
        f"{idle['model']} ({idle['model_bytes']} bytes). Install model: MatMul by a "
        f"float32 {install['weight_shape']} initializer, {install['model_bytes']} bytes, "
        "inline. RSS/peak from /proc/self/status (VmRSS/VmHWM) of fresh child processes; "
        f"page cache excluded. Total run {total_s:.1f} s."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=None,
                        help="install model size (default 256, 32 with --quick)")
    parser.add_argument("--idle-s", type=float, default=None,
                        help="idle window in seconds (default 5, 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="32 MiB model, 2 s idle window")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: /tmp)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        print(json.dumps(_CHILDREN[kind](rest)))
        return 0
    size_mib = args.size_mib or (32 if args.quick else 256)
    idle_s = args.idle_s or (2.0 if args.quick else 5.0)
    if size_mib < 1 or idle_s <= 0:
        parser.error("--size-mib and --idle-s must be positive")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-", dir=args.dir) as tmp:
        if not args.json:
            print(f"... idle: server, enroll, publish digits v1, agent child ({idle_s:g} s)",
                  flush=True)
        idle = bench_idle(idle_s, Path(tmp))
        if not args.json:
            print(f"... install: build, seal and open a {size_mib} MiB model", flush=True)
        install = bench_install(size_mib, Path(tmp))
    total_s = time.perf_counter() - started

    if args.json:
        print(json.dumps({"idle": idle, "install": install, "total_s": round(total_s, 1)},
                         indent=2))
        return 0
    _print_table(idle, install, total_s)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
