"""Thread sizing from the cores a process is given, one ONNX Runtime per install, and the
comparison's RESULTS.md section writer."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

from bench.compare_insightface import MARK_BEGIN, MARK_END, write_section
from worker import runtime
from worker.settings import PipelineSettings


class WorkerSettings(PipelineSettings):
    """What a Celery worker's settings add that the thread sizing reads."""

    worker_concurrency: int = 1


def test_inference_threads_share_the_cores_between_worker_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert runtime.cpu_threads(PipelineSettings()) == 8
    assert runtime.cpu_threads(WorkerSettings(worker_concurrency=2)) == 4
    assert runtime.cpu_threads(WorkerSettings(worker_concurrency=3)) == 2
    # More processes than cores: one thread each, never zero.
    assert runtime.cpu_threads(WorkerSettings(worker_concurrency=16)) == 1
    # An explicit setting wins.
    assert runtime.cpu_threads(WorkerSettings(worker_concurrency=2, threads=3)) == 3


def test_decode_threads() -> None:
    assert runtime.decode_threads(PipelineSettings()) == 2
    assert runtime.decode_threads(PipelineSettings(decode_workers=5)) == 5


def test_sessions_do_not_spin_and_use_the_thread_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.models import resolve_model

    seen = {}
    real = runtime.ort.InferenceSession

    def spy(model, sess_options, providers):  # type: ignore[no-untyped-def]
        seen["spinning"] = sess_options.get_session_config_entry("session.intra_op.allow_spinning")
        seen["threads"] = sess_options.intra_op_num_threads
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    runtime.onnx_session(resolve_model("scrfd_500m_bnkps").path, PipelineSettings(threads=1))
    assert seen == {"spinning": "0", "threads": 1}


def test_cpu_sessions_share_one_arena_and_plan_no_per_shape_patterns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memory settings of docs/throughput.md reach every CPU session, and sessions made
    that way run: SCRFD on two photo shapes and the embedder on two batch sizes."""
    import numpy as np

    from worker.models import resolve_model

    seen = []
    real = runtime.ort.InferenceSession

    def spy(model, sess_options, providers):  # type: ignore[no-untyped-def]
        seen.append(
            (
                sess_options.get_session_config_entry("session.use_env_allocators"),
                sess_options.enable_mem_pattern,
            )
        )
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    settings = PipelineSettings(device="cpu", threads=1)
    scrfd = runtime.onnx_session(resolve_model("scrfd_500m_bnkps").path, settings)
    arcface = runtime.onnx_session(resolve_model("w600k_mbf").path, settings)
    assert seen == [("1", False), ("1", False)]
    for shape in ((1, 3, 320, 640), (1, 3, 640, 480)):
        outputs = scrfd.run(None, {scrfd.get_inputs()[0].name: np.zeros(shape, np.float32)})
        assert len(outputs) == 9
    for batch in (3, 8):
        chips = np.zeros((batch, 3, 112, 112), np.float32)
        (vectors,) = arcface.run(None, {arcface.get_inputs()[0].name: chips})
        assert vectors.shape == (batch, 512)


def test_both_onnx_runtimes_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "version", lambda dist: "1.23.2")
    with pytest.raises(RuntimeError, match=r"exactly one of the extras `\.\[cpu\]` or `\.\[gpu\]`"):
        runtime.onnx_providers(PipelineSettings(device="auto"))


def test_comparison_section_replaces_only_itself(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- scale -->\nscale rows\n<!-- scale -->\n")
    write_section(results, f"{MARK_BEGIN}\nfirst\n{MARK_END}")
    write_section(results, f"{MARK_BEGIN}\nsecond\n{MARK_END}")
    text = results.read_text()
    assert "scale rows" in text and "second" in text and "first" not in text
    assert text.count(MARK_BEGIN) == 1


def test_freed_memory_is_handed_back_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's; elsewhere release_freed_memory does nothing")
    assert runtime._malloc_trim() is not None
    runtime.release_freed_memory()
