"""The budgeted first-light run behind ``scripts/gpu-check.sh`` (standard library only; see that script).

Stages, in priority order; each has a time estimate (on an H100), and a stage that would
not fit in what is left of the budget is skipped and listed as skipped:

    env        a  environment report: nvidia-smi, ``bertfast info --json``
    build      a  the CUDA build for this GPU's architecture only (reused when the installed build
                  already has it, or taken from a carried prebuilt extension)
    smoke      b  GPU smoke tests (``pytest -m gpu_smoke tests/test_gpu_smoke.py``)
    bench      c  headline benchmarks (``python -m bench.firstlight``), result file
                  rendered (README and plots)
    sanitizer  d  compute-sanitizer memcheck on ``python -m tools.gpu.launch_all``
    rest       e  the rest of the test suite, then the quick benchmark suite, until the budget ends

Every stage streams its output into the combined log as it runs and, when it ends, its
files are packed into one archive, so a run that is killed keeps everything finished before
it.  The output folder never holds more than these files (a GPU call brings back at most 8):

    summary.json, summary.txt   every stage: status, seconds, estimate, key numbers
    gpu-check.log               all stages' output, in order
    artifacts.tar.gz            per-stage logs, JUnit XML, per-test outcomes (logs/*-outcomes.txt, written
                                as each test ends), info.json, nvidia-smi, the rendered results
                                folder (results/<gpu-slug>/: JSON, README.md, PNGs)
    result.json                 the benchmark result file (schema: bertfast/benchmarking/schema.py)
    bench-README.md             its rendered README
    profile.txt                 the host-overhead probe's profiler tables

``--dry-run``: the same plan on the CPU at tiny sizes (Triton's interpreter, the extension's
CPU kernels, no build, no sanitizer binary), within about 60 s; CI runs it.  It runs every stage
whatever the clock says (a stage far past its estimate is stopped as a hang) and reports its time
against the budget; it fails when a stage fails, or when stages a-d could never fit the GPU budget
on their H100 estimates (:func:`gpu_plan_problem`), not because the machine is busy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_FILES = (
    "summary.json",
    "summary.txt",
    "gpu-check.log",
    "artifacts.tar.gz",
    "result.json",
    "bench-README.md",
    "profile.txt",
)
MARGIN_S = 5  # kept back at the end for the summary and the archive
INTERRUPT_WAIT_S = 10  # a command stopped at its limit gets this long to report (pytest: failures, JUnit)

# name -> (letter, title, estimate on an H100 in seconds, estimate of the dry run in seconds)
STAGES = {
    "env": ("a", "environment report", 10, 8),
    "build": ("a", "CUDA build for this GPU's architecture", 50, 4),
    "smoke": ("b", "GPU smoke tests", 90, 14),
    "bench": ("c", "headline benchmarks", 220, 20),
    "sanitizer": ("d", "compute-sanitizer memcheck of every kernel", 60, 8),
    "rest": ("e", "the rest of the tests and benchmark suites", 30, 1),
}
# The build when an installed or carried build already fits: a load check only.
REUSED_BUILD_S = 8  # with the check that the extension's errors reach Python
GPU_BUDGET_S = 420  # the default budget of a run on the GPU
# A dry run checks that every stage works, on whatever machine runs it: its budget is reported, not enforced,
# and a stage is stopped only far past its estimate (a hang), not because the machine is busy.
DRY_STAGE_TIMEOUT_FACTOR, DRY_STAGE_MIN_TIMEOUT_S = 10, 120


def gpu_plan_problem(budget_s: float = GPU_BUDGET_S) -> str | None:
    """Why stages a-d could never all run in a GPU budget (their H100 estimates, with a reused build), or None."""
    estimates = {name: gpu for name, (letter, _, gpu, _) in STAGES.items() if letter in "abcd"}
    needed = sum(estimates.values()) - estimates["build"] + REUSED_BUILD_S + MARGIN_S
    if needed > budget_s:
        return f"stages a-d need about {needed} s on an H100 even with a reused build, past the {budget_s} s budget"
    return None


class Check:
    def __init__(self, args):
        self.dry = args.dry_run
        self.budget_s = args.budget_s if args.budget_s is not None else (60 if self.dry else GPU_BUDGET_S)
        self.started = time.monotonic()
        self.deadline = self.started + self.budget_s
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        if self.work == self.out or self.out in self.work.parents:
            raise SystemExit("gpu-check: the work folder must be outside the output folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:  # a fresh run: nothing stale comes back
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        self.python = args.python or sys.executable
        self.triton_cache = args.triton_cache or os.environ.get("TRITON_CACHE_DIR")
        self.prebuilt_ext = args.prebuilt_ext or os.environ.get("BERTFAST_PREBUILT_EXT")
        self.only = set(args.only.split(",")) if args.only else None
        self.commit = args.commit or os.environ.get("BERTFAST_COMMIT")
        self.log = open(self.out / "gpu-check.log", "a", encoding="utf-8", buffering=1)
        self.stages = [
            {
                "name": name,
                "stage": letter,
                "title": title,
                "estimate_s": dry if self.dry else gpu,
                "status": "pending",
                "seconds": None,
                "numbers": {},
            }
            for name, (letter, title, gpu, dry) in STAGES.items()
        ]
        self.capability: tuple[int, int] | None = None
        self.env = self._environment()

    # -- environment of every command ------------------------------------------------------
    def _environment(self) -> dict:
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        if self.triton_cache:
            env["TRITON_CACHE_DIR"] = str(Path(self.triton_cache).resolve())
        if self.commit:
            env["BERTFAST_COMMIT"] = self.commit
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU plan, even on a GPU machine
            env["TRITON_INTERPRET"] = "1"
            env["BERTFAST_GPU_SMOKE_TINY"] = "1"
        return env

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    # -- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write_summary(self) -> None:
        data = {
            "dry_run": self.dry,
            "budget_s": self.budget_s,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "python": self.python,
            "triton_cache": self.triton_cache,
            "prebuilt_ext": self.prebuilt_ext,
            "commit": self.commit,
            "stages": self.stages,
        }
        _write_atomic(self.out / "summary.json", json.dumps(data, indent=1) + "\n")
        lines = [
            f"gpu-check {'(dry run) ' if self.dry else ''}budget {self.budget_s:.0f} s, "
            f"elapsed {data['elapsed_s']:.0f} s",
            "",
        ]
        for s in self.stages:
            took = "-" if s["seconds"] is None else f"{s['seconds']:.0f} s"
            lines.append(
                f"{s['stage']}  {s['name']:<10} {s['status']:<8} {took:>6}  (estimate {s['estimate_s']:.0f} s)  "
                f"{s['title']}" + (f": {s['reason']}" if s.get("reason") else "")
            )
            for key, value in s["numbers"].items():
                if isinstance(value, dict) and len(json.dumps(value)) > 160:  # one line per entry
                    lines.append(f"     {key}:")
                    lines += [f"       {k}: {json.dumps(v)[:300]}" for k, v in value.items()]
                    continue
                text = json.dumps(value) if not isinstance(value, str) else value
                lines.append(f"     {key}: {text[:2000]}")
        _write_atomic(self.out / "summary.txt", "\n".join(lines) + "\n")

    def pack(self) -> None:
        """Everything in the work folder into one archive in the output folder (replaced atomically)."""
        tmp = self.work.parent / f".{self.work.name}-artifacts.tar.gz"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if path.is_file() and path.stat().st_size <= (8 << 20):
                    tar.add(path, arcname=str(path.relative_to(self.work)))
        shutil.move(str(tmp), self.out / "artifacts.tar.gz")

    # -- running commands ------------------------------------------------------------------
    def run(self, stage: dict, name: str, command: list[str], timeout_s: float, env: dict | None = None) -> int:
        """Run one command; its output goes to the stage's log and the combined log as it comes."""
        timeout_s = max(1.0, timeout_s if self.dry else min(timeout_s, self.left_s() - MARGIN_S))
        self.say(f"$ {' '.join(command)}   (at most {timeout_s:.0f} s)")
        log_path = self.work / "logs" / f"{stage['name']}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as stage_log:
            stage_log.write(f"===== {name}: {' '.join(command)}\n")
            stage_log.flush()
            try:
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env or self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    start_new_session=True,
                )
            except OSError as exc:
                self.say(f"{name}: cannot start: {exc}")
                stage_log.write(f"cannot start: {exc}\n")
                return 127

            def pump():
                for line in proc.stdout:
                    stage_log.write(line)
                    self.log.write(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.say(f"{name}: timed out after {timeout_s:.0f} s; stopping it")
                _kill_group(proc)
                rc = 124
            reader.join(timeout=10)
            stage_log.write(f"===== {name}: exit {rc}\n")
        self.say(f"{name}: exit {rc}")
        return rc

    def capture(self, command: list[str], timeout_s: float = 60) -> tuple[int, str]:
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s, errors="replace"
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 127, str(exc)
        return done.returncode, done.stdout + done.stderr

    # -- the plan ---------------------------------------------------------------------------
    def main(self) -> int:
        self.say(
            f"{'dry run, ' if self.dry else ''}budget {self.budget_s:.0f} s; output {self.out}; work {self.work}; "
            f"python {self.python}; triton cache {self.triton_cache or '-'}; prebuilt extension "
            f"{self.prebuilt_ext or '-'}"
        )
        self.write_summary()
        handlers = {
            "env": self.stage_env,
            "build": self.stage_build,
            "smoke": self.stage_smoke,
            "bench": self.stage_bench,
            "sanitizer": self.stage_sanitizer,
            "rest": self.stage_rest,
        }
        for index, stage in enumerate(self.stages):
            if self.only is not None and stage["name"] not in self.only:
                stage.update(status="skipped", reason="not selected (--only)")
                self.write_summary()
                continue
            if stage["name"] == "build" and not self.dry:
                stage["estimate_s"] = self._build_estimate()
            if stage["name"] == "build" and self.dry:
                stage["estimate_s"] = 1  # a dry run only reads what stage env found
            left = self.left_s() - MARGIN_S
            if stage["estimate_s"] > left and not self.dry:
                stage.update(
                    status="skipped",
                    reason=f"out of time: about {stage['estimate_s']} s needed, {max(left, 0):.0f} s left",
                )
                self.say(f"stage {stage['stage']} {stage['name']}: skipped ({stage['reason']})")
                self.write_summary()
                continue
            if self.dry:
                stage["timeout_s"] = max(stage["estimate_s"] * DRY_STAGE_TIMEOUT_FACTOR, DRY_STAGE_MIN_TIMEOUT_S)
            else:  # keep the estimates of the later stages a-d back where possible (stage e gets what is left)
                later = sum(s["estimate_s"] for s in self.stages[index + 1 :] if s["stage"] in "abcd")
                timeout = max(stage["estimate_s"] * 1.5, left - later) if stage["stage"] != "e" else left
                stage["timeout_s"] = round(min(timeout, left))
            stage["status"] = "running"
            self.say(
                f"===== stage {stage['stage']} {stage['name']}: {stage['title']} (estimate {stage['estimate_s']} s, "
                f"at most {stage['timeout_s']} s, {left:.0f} s left)"
            )
            self.write_summary()
            began = time.monotonic()
            try:
                status = handlers[stage["name"]](stage)
            except Exception as exc:  # the driver itself must never lose the summary
                status = "failed"
                stage["reason"] = f"gpu-check error: {type(exc).__name__}: {exc}"
            stage["status"] = status
            stage["seconds"] = round(time.monotonic() - began, 1)
            self.say(f"stage {stage['name']}: {status} in {stage['seconds']:.0f} s")
            self.write_summary()
            self.pack()
        self.write_summary()
        self.pack()
        self.say("summary:\n" + (self.out / "summary.txt").read_text())
        files = sorted(p.name for p in self.out.iterdir())
        self.say(f"output folder {self.out}: {', '.join(files)}")
        failed = [s["name"] for s in self.stages if s["status"] in ("failed", "timeout")]
        if not self.dry:
            return 1 if failed else 0
        # A dry run keeps the plan working: it fails on a stage's own failure, or on a plan that could never
        # fit on the GPU; its own time depends on how busy this machine is, so it is reported only.
        elapsed = time.monotonic() - self.started
        if elapsed > self.budget_s:
            self.say(f"dry run: {elapsed:.0f} s, past its {self.budget_s:.0f} s budget (a busy or slow machine; "
                     "reported, not a failure)")  # fmt: skip
        problem = gpu_plan_problem()
        if problem:
            self.say(f"dry run: the GPU plan does not fit: {problem}")
        return 1 if failed or problem else 0

    # -- stage a: environment ------------------------------------------------------------------
    def stage_env(self, stage: dict) -> str:
        if shutil.which("nvidia-smi"):
            rc, text = self.capture(["nvidia-smi"], 30)
            (self.work / "nvidia-smi.txt").write_text(text)
            self.log.write(text)
            rc, text = self.capture(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                30,
            )
            if rc == 0:
                stage["numbers"]["nvidia-smi"] = text.strip()
        elif not self.dry:
            stage["numbers"]["nvidia-smi"] = "not found"
        rc, text = self.capture([self.python, "-c", self._PROBE], 180)
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "logs" / "env.log").write_text(text)
        self.log.write(text)
        facts = _last_json(text)
        if facts is None:
            stage["reason"] = f"the probe failed: {text.strip()[-500:]}"
            return "failed"
        self._state = facts.pop("build", {})
        info = facts.pop("info", None)
        stage["numbers"].update({k: v for k, v in facts.items() if v is not None})
        if facts.get("capability"):
            self.capability = tuple(facts["capability"])
        if not self.dry and not facts.get("cuda"):
            stage["reason"] = "CUDA is not available to torch (use --dry-run on a machine without a GPU)"
            return "failed"
        if not isinstance(info, dict):
            stage["reason"] = f"bertfast info failed: {info}"
            return "failed"
        (self.work / "info.json").write_text(json.dumps(info, indent=1))
        for key in ("triton", "transformers", "GPU"):
            if key in info:
                stage["numbers"][key] = info[key]
        stage["numbers"]["backends"] = info.get("backends")
        return "ok"

    # -- stage a: build --------------------------------------------------------------------------
    # One interpreter start for the facts of stage a: torch and the GPU, `bertfast info`, the extension's build.
    _PROBE = (
        "import json, torch\n"
        "cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None\n"
        "out = {'cuda': torch.cuda.is_available(), 'capability': cap, 'torch': torch.__version__,\n"
        "       'torch_cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if cap else None}\n"
        "build = out['build'] = {'installed': False}\n"
        "try:\n"
        "    import bertfast.kernels\n"
        "    build['installed'] = True\n"
        "    from bertfast import _ext\n"
        "    build.update(_ext.build_info())\n"
        "    if cap and build.get('built') and build.get('cuda_kernels'):\n"
        "        from bertfast.ops.ext_backend import _arch_reason\n"
        "        build['arch_reason'] = _arch_reason(build['cuda_archs'], tuple(cap))\n"
        "except Exception as exc:\n"
        "    build['error'] = f'{type(exc).__name__}: {exc}'\n"
        "try:\n"
        "    from bertfast.env_report import format_report, report\n"
        "    out['info'] = report()\n"
        "    print(format_report(out['info']))\n"
        "except Exception as exc:\n"
        "    out['info'] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out, default=str))\n"
    )

    def _build_state(self) -> dict:
        rc, text = self.capture([self.python, "-c", self._PROBE], 180)
        return (_last_json(text) or {}).get("build") or {"error": text.strip()[-500:]}

    def _usable(self, state: dict) -> bool:
        if not state.get("installed") or not state.get("built"):
            return False
        if self.dry:
            return True  # the CPU kernels are what the dry run needs
        return bool(state.get("cuda_kernels")) and state.get("arch_reason") is None

    def _build_estimate(self) -> int:
        """Quick: a load check, when the installed build, one in the tree or a carried one already fits."""
        self._state = getattr(self, "_state", None) or self._build_state()
        if self._usable(self._state):
            return REUSED_BUILD_S
        in_tree = any((ROOT / "bertfast").glob("_C*.so"))
        if in_tree or (self.prebuilt_ext and Path(self.prebuilt_ext).exists()):
            return REUSED_BUILD_S + 12  # an editable install without building, then the load check
        return STAGES["build"][2]

    def _install_without_building(self, stage: dict) -> dict:
        """``pip install -e .`` with ``BERTFAST_BUILD_EXT=0``: the package, and whatever extension is in the tree."""
        command = [self.python, "-m", "pip", "install", "-e", ".", "--no-deps", "--no-build-isolation", "-q"]
        self.run(stage, "editable install without building", command, 180, env={**self.env, "BERTFAST_BUILD_EXT": "0"})
        return self._build_state()

    def stage_build(self, stage: dict) -> str:
        status = self._build(stage)
        if status != "ok":
            return status
        # An extension whose C++ errors kill the process (seen: a segfault on bad input, built with the
        # machine's default compiler) ends every test run that checks an error: find out now, and if so
        # try once more with the system compiler.
        crash = self._error_probe()
        stage["numbers"]["errors reach Python"] = crash or "yes"
        gdb = shutil.which("gdb")
        killed = crash is not None and "kills the process" in crash  # a signal, not a timeout or a wrong error
        if killed and gdb and not self.dry:  # the native stack of the crash, into this stage's log
            probe = "from bertfast._ext import _ERROR_PROBE; exec(_ERROR_PROBE)"
            self.run(
                stage,
                "crash backtrace",
                [gdb, "-batch", "-ex", "run", "-ex", "bt", "--args", self.python, "-c", probe],
                90,
            )
        system_cxx = shutil.which("g++", path="/usr/bin")
        if crash and system_cxx and os.environ.get("CXX") != system_cxx and not self.dry:
            self.say(f"{crash}; rebuilding with CXX={system_cxx}")
            env = {**self._build_env(), "CXX": system_cxx, "CC": shutil.which("gcc", path="/usr/bin") or "gcc"}
            rc = self.run(stage, f"rebuild with {system_cxx}", self._build_command(), max(stage["timeout_s"], 100), env)
            crash = self._error_probe() if rc == 0 else f"the rebuild failed (exit {rc})"
            stage["numbers"][f"errors reach Python, built with {system_cxx}"] = crash or "yes"
        return "failed" if crash else "ok"

    def _error_probe(self) -> str | None:
        code = (
            "from bertfast._ext import errors_reach_python as p; r = p(); print(r or 'yes'); raise SystemExit(bool(r))"
        )
        rc, out = self.capture([self.python, "-c", code], timeout_s=150)
        return None if rc == 0 else (out.strip().splitlines()[-1:] or [f"exit {rc}"])[0]

    def _arch(self) -> str | None:
        """This GPU's architecture as TORCH_CUDA_ARCH_LIST writes it ("9.0"), None without a GPU."""
        return f"{self.capability[0]}.{self.capability[1]}" if self.capability else None

    def _build_env(self) -> dict:
        return {**self.env, "BERTFAST_CUDA": "1", "TORCH_CUDA_ARCH_LIST": self._arch() or "9.0"}

    def _build_command(self) -> list[str]:
        return [self.python, "-m", "pip", "install", "-v", "-e", ".", "--no-deps", "--no-build-isolation"]

    def _build(self, stage: dict) -> str:
        state = getattr(self, "_state", None) or self._build_state()
        arch = self._arch()
        stage["numbers"]["arch"] = arch or "cpu"
        if self._usable(state):
            stage["numbers"].update(action="reused the installed build", archs=state.get("cuda_archs", ""))
            return "ok"
        if not self.dry and not state.get("installed") and any((ROOT / "bertfast").glob("_C*.so")):
            state = self._install_without_building(stage)
            if self._usable(state):
                stage["numbers"].update(action="reused the extension in the tree", archs=state.get("cuda_archs"))
                return "ok"
        if self.prebuilt_ext and not self.dry:
            source = Path(self.prebuilt_ext)
            if source.is_dir():
                found = sorted(source.glob("_C*.so"))
                source = found[0] if found else source
            if source.is_file():
                if not state.get("installed"):
                    state = self._install_without_building(stage)
                target = ROOT / "bertfast" / source.name
                if source.resolve() != target.resolve():
                    shutil.copy2(source, target)
                    self.say(f"copied the prebuilt extension {source} to {target}")
                state = self._build_state()
                if self._usable(state):
                    stage["numbers"].update(action=f"prebuilt extension {source.name}", archs=state.get("cuda_archs"))
                    return "ok"
                self.say(f"the prebuilt extension does not fit here ({state}); building")
        if self.dry:
            stage["reason"] = f"the extension is not built or does not load: {state}"
            stage["numbers"]["action"] = "none (a dry run does not build; run make setup)"
            return "failed"
        # At least 100 s: a build stopped half-way leaves nothing (38 s for sm_90 on 16 cores at first light).
        limit = max(stage["timeout_s"], 100)
        name = f"build for sm_{(arch or '9.0').replace('.', '')}"
        rc = self.run(stage, name, self._build_command(), limit, self._build_env())
        state = self._build_state()
        stage["numbers"].update(action=f"built for {arch}", archs=state.get("cuda_archs"), exit=rc)
        if rc == 124:
            return "timeout"
        return "ok" if rc == 0 and self._usable(state) else "failed"

    # -- stage b: smoke tests ----------------------------------------------------------------
    def stage_smoke(self, stage: dict) -> str:
        xml, outcomes = self.work / "smoke.xml", self.work / "logs" / "smoke-outcomes.txt"
        command = [self.python, "-m", "pytest", "tests/test_gpu_smoke.py", "-m", "gpu_smoke", "-v", "-rfEs"]
        command += [*_recording(xml, outcomes)]
        rc = self.run(stage, "smoke tests", command, stage["timeout_s"])
        stage["numbers"].update(_junit_counts(xml) if xml.exists() else _outcome_counts(outcomes))
        return _status(rc)

    # -- stage c: headline benchmarks --------------------------------------------------------
    def stage_bench(self, stage: dict) -> str:
        results, numbers = self.work / "results", self.work / "bench-numbers.json"
        # Straight into the output folder, so a run stopped from outside still brings them back.
        profile, mirror = self.out / "profile.txt", self.out / "result.json"
        budget = max(10.0, stage["timeout_s"] - (10 if self.dry else 25))  # room to save and render
        command = [self.python, "-m", "bench.firstlight", "--results", str(results)]
        command += ["--budget-s", f"{budget:.0f}", "--profile", str(profile), "--numbers", str(numbers)]
        command += ["--mirror", str(mirror)]
        command.append("--render")
        if self.dry:
            command.append("--tiny")
        rc = self.run(stage, "first-light benchmarks", command, stage["timeout_s"])
        if numbers.exists():
            stage["numbers"].update(json.loads(numbers.read_text()))
        result = stage["numbers"].get("result_file")
        if result and Path(result).exists():
            folder = str(Path(result).parent)
            readme = Path(folder) / "README.md"
            if not readme.exists() or readme.stat().st_mtime < Path(result).stat().st_mtime:  # killed before it
                command = [self.python, "-m", "bench.render", folder, "--file", result]
                self.run(stage, "render", command, max(20.0, self.left_s() - MARGIN_S))
            if readme.exists():
                shutil.copy2(readme, self.out / "bench-README.md")
            stage["numbers"]["result_file"] = str(Path(result).relative_to(self.work))
        if rc == 124:
            return "timeout"
        return "ok" if rc == 0 else "failed"

    # -- stage d: sanitizer ------------------------------------------------------------------
    def stage_sanitizer(self, stage: dict) -> str:
        command = [self.python, "-m", "tools.gpu.launch_all"]
        if self.dry:
            stage["numbers"]["sanitizer"] = "none in a dry run: the launch script runs on the CPU"
        else:
            sanitizer = shutil.which("compute-sanitizer") or _cuda_tool("compute-sanitizer")
            if sanitizer is None:
                stage["reason"] = "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"
                return "failed"
            log = self.work / "memcheck.txt"
            command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", f"--log-file={log}", *command]
        # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees the bounds.
        env = {**self.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        rc = self.run(stage, "memcheck", command, stage["timeout_s"], env=env)
        log = self.work / "memcheck.txt"
        if log.exists():
            text = log.read_text(errors="replace")
            self.log.write(text[-20000:])
            summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
            stage["numbers"]["memcheck"] = summary[-1].strip() if summary else "no summary line"
        launched = self.work / "logs" / "sanitizer.log"
        if launched.exists():
            lines = [line for line in launched.read_text(errors="replace").splitlines() if "launched" in line]
            if lines:
                stage["numbers"]["launches"] = lines[-1].strip()
        if rc == 124:
            return "timeout"
        return "ok" if rc == 0 else "failed"

    # -- stage e: the rest ---------------------------------------------------------------------
    def stage_rest(self, stage: dict) -> str:
        if self.dry:
            # CI runs the suites themselves (`make test`); the dry run checks that stage e's commands are there.
            missing = [p for p in ("tests", "bench/run_gpu.sh") if not (ROOT / p).exists()]
            if not os.access(ROOT / "bench/run_gpu.sh", os.X_OK):
                missing.append("bench/run_gpu.sh is not executable")
            stage["numbers"]["plan"] = "pytest tests -m 'not gpu_smoke'; bench/run_gpu.sh --bench-quick"
            if missing:
                stage["reason"] = f"missing: {', '.join(missing)}"
                return "failed"
            return "ok"
        # The extension's tests on their own, first (they are short): a crash in one of them (a segfault ends
        # the process) must not cost the rest of the suite its results.  Each test's outcome is written to
        # logs/<name>-outcomes.txt as it ends, so a run killed before its JUnit report still names every result;
        # a run stopped at the budget gets SIGINT first, so pytest still prints its failures and JUnit report.
        # With pytest-xdist, tests run in parallel worker processes: a crashing test costs its worker only
        # (reported as failed, the worker replaced), and the suite gets through more of the budget.
        status = "ok"
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
        parallel = ["-n", str(workers)] if self.capture([self.python, "-c", "import xdist"])[0] == 0 else []
        stage["numbers"]["pytest workers"] = workers if parallel else 1
        for name, selection in (
            # one file: its tests spread one by one; the suite: file by file (module fixtures run once)
            ("ext tests", ["tests/test_ext_ops.py", *(parallel and ["--dist", "load"])]),
            ("tests", ["tests", "--ignore=tests/test_ext_ops.py", *(parallel and ["--dist", "loadfile"])]),
        ):
            if self.left_s() - MARGIN_S - INTERRUPT_WAIT_S < 20:
                stage["numbers"][name] = "not run: out of time"
                continue
            xml = self.work / f"{name.replace(' ', '-')}.xml"
            outcomes = self.work / "logs" / f"{name.replace(' ', '-')}-outcomes.txt"
            command = [self.python, "-m", "pytest", *selection, "-m", "not gpu_smoke", "-v", "-rfEs", "--tb=short"]
            command += [*_recording(xml, outcomes), *parallel]
            rc = self.run(stage, name, command, self.left_s() - MARGIN_S - INTERRUPT_WAIT_S)
            stage["numbers"][name] = _junit_counts(xml) if xml.exists() else {"exit": rc, **_outcome_counts(outcomes)}
            if rc == 124:  # stage e runs until the budget ends: being stopped then is its normal end
                status = "stopped" if status == "ok" else status
            elif rc != 0:
                status = "failed"
        if self.left_s() - MARGIN_S > 90:
            env = {**self.env, "PYTHON": self.python, "BERTFAST_RESULTS": str(self.work / "suite-results")}
            env["BERTFAST_BUDGET_S"] = str(int(self.left_s() - MARGIN_S))
            rc = self.run(
                stage, "benchmark suite", ["bench/run_gpu.sh", "--bench-quick"], self.left_s() - MARGIN_S, env
            )
            stage["numbers"]["bench suite exit"] = rc
        else:
            stage["numbers"]["bench suite"] = "not run: out of time"
        return status


def _status(rc: int) -> str:
    if rc == 124:
        return "timeout"
    if rc == 0:
        return "ok"
    return "failed"


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {"junit": "no report"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"junit": f"unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if failed:
        counts["failed"] = failed[:15]
    return counts


def _recording(xml: Path, outcomes: Path) -> list[str]:
    """pytest options that record the run: the JUnit report (written at the end) and, line by line as each
    test ends, ``OUTCOME nodeid`` in ``outcomes`` (tests/outcome_log.py), which a stopped run keeps."""
    outcomes.parent.mkdir(parents=True, exist_ok=True)
    return ["-p", "no:cacheprovider", f"--junitxml={xml}", "-p", "tests.outcome_log", f"--outcome-log={outcomes}"]


def _outcome_counts(path: Path) -> dict:
    """Counts of the ``OUTCOME nodeid`` lines tests/outcome_log.py wrote (the JUnit report never came)."""
    counts: dict = {"junit": f"none: counted from {path.name}"}
    failed = []
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        outcome, _, nodeid = line.partition(" ")
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(nodeid)
    if failed:
        counts["failed tests"] = failed[:15]
    return counts


def _last_json(text: str, whole: bool = False):
    if whole:
        start = text.find("{")
        with contextlib.suppress(ValueError):
            return json.loads(text[start:]) if start >= 0 else None
        return None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return None


def _cuda_tool(name: str) -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    # SIGINT first: pytest then stops like after Ctrl-C, printing its failures and writing its JUnit report.
    for sig, wait in ((signal.SIGINT, INTERRUPT_WAIT_S), (signal.SIGTERM, 4), (signal.SIGKILL, 4)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (default 420; a dry run only reports 60)"
    )
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at tiny sizes")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check"), help="output folder")
    parser.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK"), help="work folder (default: a temp dir)")
    parser.add_argument("--triton-cache", default=None, help="a carried Triton cache (else $TRITON_CACHE_DIR)")
    parser.add_argument(
        "--prebuilt-ext",
        default=None,
        help="a carried bertfast/_C*.so built for this torch (else $BERTFAST_PREBUILT_EXT)",
    )
    parser.add_argument(
        "--only", default=None, help="comma list of stages to run (env,build,smoke,bench,sanitizer,rest)"
    )
    parser.add_argument("--python", default=None, help="the interpreter (default: this one)")
    parser.add_argument(
        "--commit",
        default=None,
        help="the commit recorded in result files where the tree has no .git ($BERTFAST_COMMIT)",
    )
    args = parser.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(STAGES):
        parser.error(f"--only takes stages from {', '.join(STAGES)}")
    check = Check(args)
    try:
        return check.main()
    finally:
        check.log.close()


if __name__ == "__main__":
    sys.exit(main())
