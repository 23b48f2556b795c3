"""launch/: the TPU pod, xpk and SLURM scripts, exercised without gcloud, xpk or SLURM.

Dry runs are parsed back with shlex and compared argument by argument, and the remote and container commands they
print are then executed here (in a fake worker home directory, or inside xpk's container wrapper), so a quoting
mistake shows up as a wrong argv rather than as a string that merely looks right. A fake `gcloud` (2 workers, each
its own home directory) runs a whole non-dry launch; fake `srun`/`scontrol` run the sbatch script.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_POD = LAUNCH / "tpu_pod.sh"
XPK = LAUNCH / "xpk.sh"
SBATCH = LAUNCH / "slurm_gpu.sbatch"

# A user command whose arguments need quoting: a space, a single quote, a $ that must not expand, an empty string.
ECHO_ARGV = [sys.executable, "-c", "import json, sys; print('ARGV ' + json.dumps(sys.argv[1:]))"]
TRICKY = ["--config.wandb_name=my run", "it's", "$HOME", ""]


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def poisoned_path(tmp_path):
  """PATH whose gcloud, xpk, srun and scontrol fail loudly: a dry run must call none of them."""
  bin_dir = tmp_path / "poison"
  bin_dir.mkdir()
  marker = tmp_path / "called"
  for tool in ("gcloud", "xpk", "srun", "scontrol", "docker"):
    _write_exe(bin_dir / tool, f"""\
      #!/bin/sh
      echo "{tool} $*" >> {shlex.quote(str(marker))}
      exit 99
      """)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  return env, marker


# The worker side of tpu_pod.sh runs on Linux TPU VMs: it needs setsid and GNU tail --pid.
needs_worker_tools = pytest.mark.skipif(
    shutil.which("setsid") is None or subprocess.run(["tail", "--pid=1", "-n", "0", os.devnull],
                                                     capture_output=True).returncode != 0,
    reason="the tpu_pod.sh worker side needs setsid and GNU tail --pid (Linux)")


def _run(args, env=None, cwd=ROOT, timeout=60, **kw):
  return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        **kw)


def _commands(stdout: str) -> list[list[str]]:
  """The argv of every '+ ' line of a dry run."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(argv: list[str], name: str) -> str:
  values = [a[len(name) + 1:] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# ------------------------------------------------------------------------------------------------------------------
# tpu_pod.sh
# ------------------------------------------------------------------------------------------------------------------

def _tpu_dry_run(env, *extra, cmd=("python", "-m", "jopd.train", "--config=configs/deepmath.py", *TRICKY)):
  res = _run([TPU_POD, "--tpu=opd-v5p", "--zone=us-east5-a", "--project=my-proj", "--run-name=r1", "--dry-run",
              *extra, "--", *cmd], env=env)
  assert res.returncode == 0, res.stderr
  return res


def test_tpu_pod_dry_run_prints_every_gcloud_command_and_calls_none(poisoned_path, tmp_path):
  env, marker = poisoned_path
  res = _tpu_dry_run(env, "--spot")
  assert not marker.exists(), marker.read_text()
  cmds = _commands(res.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  loc = ["--zone=us-east5-a", "--project=my-proj"]
  assert gcloud[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "opd-v5p", *loc,
                       "--format=value(state,acceleratorType)"]
  assert gcloud[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "opd-v5p", *loc,
                       "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
  assert gcloud[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{tmp_path}/jopd-opd-v5p-r1.tar.gz",
                       "opd-v5p:jopd-r1.tar.gz", *loc, "--worker=all"]
  setup, run = gcloud[3], gcloud[4]
  assert len(gcloud) == 5
  for ssh in (setup, run):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "opd-v5p"]
    assert "--worker=all" in ssh and ssh[6:8] == loc
  # Setup: unpack on every worker, then install with the pinned constraints plus jax[tpu].
  remote_setup = shlex.split(_flag(setup, "--command"))
  assert remote_setup[-6:] == ["bash", ".jopd-stage-r1/launch/tpu_pod.sh", "--worker-setup", "--src=~/.jopd-stage-r1",
                              "--repo-dir=~/jopd", "--python=3.11"]
  assert "tar" in remote_setup and "jopd-r1.tar.gz" in remote_setup
  # Run: the user's command reaches the worker argument for argument.
  remote_run = shlex.split(_flag(run, "--command"))
  assert remote_run[:6] == ["bash", "~/jopd/launch/tpu_pod.sh", "--worker-run", "--repo-dir=~/jopd", "--run-name=r1",
                            "--"]
  assert remote_run[6:] == ["python", "-m", "jopd.train", "--config=configs/deepmath.py", *TRICKY]
  # The local log directory is created (only printed here), and the tarball is made from this checkout.
  assert ["mkdir", "-p", "logs/opd-v5p/r1"] in cmds
  assert f"cd {ROOT} && git ls-files" in res.stdout
  assert not (ROOT / "logs" / "opd-v5p").exists()


def test_tpu_pod_dry_run_queued_resource_and_options(poisoned_path):
  env, marker = poisoned_path
  res = _tpu_dry_run(env, "--queued", "--spot", "--accelerator-type=v6e-16", "--create-flag=--reserved",
                     "--repo-dir=/opt/my jopd", "--internal-ip", "--skip-setup", "--detach", cmd=("echo", "hi"))
  assert not marker.exists()
  gcloud = [c for c in _commands(res.stdout) if c[0] == "gcloud"]
  loc = ["--zone=us-east5-a", "--project=my-proj"]
  assert gcloud[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "opd-v5p", *loc,
                       "--format=value(state.state)"]
  assert gcloud[2] == ["gcloud", "compute", "tpus", "queued-resources", "create", "opd-v5p", "--node-id=opd-v5p", *loc,
                       "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot", "--reserved"]
  # --skip-setup: no scp, no install; straight to the run, on internal IPs, detached.
  assert not any("scp" in c for c in gcloud)
  run = gcloud[-1]
  assert "--internal-ip" in run
  assert shlex.split(_flag(run, "--command")) == [
      "bash", "/opt/my jopd/launch/tpu_pod.sh", "--worker-run", "--repo-dir=/opt/my jopd", "--run-name=r1",
      "--detach", "--", "echo", "hi"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--", "echo"], "--tpu is required"),
    (["--tpu=t", "--", "echo"], "--zone is required"),
    (["--tpu=t", "--zone=z"], "no command given"),
    (["--tpu=t", "--zone=z", "echo"], "unknown argument 'echo'"),
    (["--tpu=t", "--zone=z", "--bogus", "--", "echo"], "unknown argument '--bogus'"),
    (["--tpu=t", "--zone=z", "--run-name"], "--run-name needs a value"),
    (["--tpu=t", "--zone=z", "--stop"], "need --run-name"),
    (["--tpu=t", "--zone=z", "--accelerator-type=v9x-8", "--", "echo"], "pass --version"),
    (["--tpu=t", "--zone=z", "--run-name=a/b", "--", "echo"], "--run-name may hold only"),
])
def test_tpu_pod_usage_errors(poisoned_path, args, message):
  env, marker = poisoned_path
  res = _run([TPU_POD, "--dry-run", *args], env=env)
  assert res.returncode == 2, (res.stdout, res.stderr)
  assert message in res.stderr and "--help" in res.stderr
  assert res.stdout == "" and not marker.exists()


def test_help_exits_zero():
  for script in (TPU_POD, XPK):
    res = _run([script, "--help"])
    assert res.returncode == 0 and "Usage:" in res.stdout and "--dry-run" in res.stdout


def _fake_worker_home(tmp_path: Path, name="worker-home") -> Path:
  """A home directory holding the synced code's launch/ scripts, as the setup step leaves it on a worker."""
  home = tmp_path / name
  (home / "jopd").mkdir(parents=True)
  shutil.copytree(LAUNCH, home / "jopd" / "launch")
  return home


@needs_worker_tools
def test_tpu_pod_remote_command_runs_the_exact_argv_on_a_worker(poisoned_path, tmp_path):
  """Execute the printed --command as the worker's login shell would (sh -c): argv, cwd, exit status, logs."""
  env, _ = poisoned_path
  res = _tpu_dry_run(env, cmd=(*ECHO_ARGV, *TRICKY))
  remote = _flag(_commands(res.stdout)[-1], "--command")
  home = _fake_worker_home(tmp_path)
  worker_env = dict(os.environ, HOME=str(home), TPU_WORKER_ID="3")
  out = _run(["sh", "-c", remote], env=worker_env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  argv_lines = [l for l in out.stdout.splitlines() if l.startswith("[worker 3] ARGV ")]
  assert argv_lines == ["[worker 3] ARGV " + json.dumps(TRICKY)]
  log = (home / "jopd/logs/r1/worker-3.log").read_text()
  assert "ARGV " + json.dumps(TRICKY) in log and "exit status 0" in log
  assert (home / "jopd/logs/r1/worker-3.status").read_text().strip() == "0"

  # The command's exit status is the worker's exit status (gcloud reports it per worker).
  res = _tpu_dry_run(env, "--run-name=r2", cmd=("sh", "-c", "echo in $PWD; exit 7"))
  out = _run(["sh", "-c", _flag(_commands(res.stdout)[-1], "--command")], env=worker_env, cwd=tmp_path)
  assert out.returncode == 7
  assert f"[worker 3] in {home / 'jopd'}" in out.stdout


@needs_worker_tools
def test_tpu_pod_worker_run_is_exclusive_and_stop_delivers_sigterm(tmp_path):
  """A second run on a busy worker is refused; --worker-stop SIGTERMs the command (which saves and exits 0)."""
  home = _fake_worker_home(tmp_path)
  script = home / "jopd/launch/tpu_pod.sh"
  env = dict(os.environ, HOME=str(home), TPU_WORKER_ID="0")
  trainer = textwrap.dedent("""\
      import signal, sys, time
      def on_term(*_):
          print("checkpoint saved", flush=True)
          sys.exit(0)
      signal.signal(signal.SIGTERM, on_term)
      print("training", flush=True)
      time.sleep(60)
      """)
  start = _run(["bash", script, "--worker-run", "--run-name=a", "--detach", "--", sys.executable, "-c", trainer],
               env=env)
  assert start.returncode == 0, start.stderr
  log = home / "jopd/logs/a/worker-0.log"
  deadline = time.time() + 15
  while "training" not in log.read_text():
    assert time.time() < deadline, log.read_text()
    time.sleep(0.1)
  try:
    second = _run(["bash", script, "--worker-run", "--run-name=b", "--", "echo", "x"], env=env)
    assert second.returncode == 1 and "run a" in second.stderr and "--stop --run-name=a" in second.stderr
    # Same run name again: re-attaches to the live run instead of starting a second trainer.
    attach = subprocess.Popen(["bash", str(script), "--worker-run", "--run-name=a", "--attach"], env=env,
                              stdout=subprocess.PIPE, text=True)
    # Stop only once the attach is following the run: on a slow machine the stop could otherwise finish first.
    first = attach.stdout.readline()
    assert "run a is running" in first, first
    stop = _run(["bash", script, "--worker-stop", "--run-name=a"], env=env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "exited with status 0" in stop.stdout
    attached_out = first + attach.communicate(timeout=15)[0]
    assert attach.returncode == 0 and "[worker 0] checkpoint saved" in attached_out
  finally:
    pid_file = home / "jopd/logs/a/worker-0.pid"
    if pid_file.exists():
      try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass
  assert "checkpoint saved" in log.read_text()


FAKE_GCLOUD = r'''
#!{python}
"""Fake gcloud for tests: records calls; describe/create keep state in a file; scp copies into every worker's
home; ssh --worker=all runs the command with `sh -c` in every worker's home (HOME, TPU_WORKER_ID set)."""
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_ROOT"]
args = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
state = os.path.join(root, "state")
workers = [os.path.join(root, f"w{{i}}") for i in range(int(os.environ["FAKE_WORKERS"]))]
verb = args[3]
if verb == "describe":
    if not os.path.exists(state):
        sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found\n")
        sys.exit(1)
    print(open(state).read().strip() + "\tv5p-64")
elif verb == "create":
    open(state, "w").write("READY")
elif verb == "scp":
    src, dest = args[4], args[5].split(":", 1)[1]
    for w in workers:
        shutil.copy(src, os.path.join(w, dest))
elif verb == "ssh":
    command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    rc = 0
    for i, w in enumerate(workers):
        env = dict(os.environ, HOME=w, TPU_WORKER_ID=str(i))
        out = subprocess.run(["sh", "-c", command], env=env, cwd=w, stdout=subprocess.PIPE)
        sys.stdout.write(out.stdout.decode())
        sys.stdout.flush()
        rc = rc or out.returncode
    sys.exit(rc)
else:
    sys.exit("fake gcloud: unexpected " + " ".join(args))
'''

FAKE_UV = '''
#!/bin/sh
echo "uv $*" >> "$FAKE_ROOT/uv.log"
if [ "$1" = venv ]; then
  mkdir -p .venv/bin
  printf '#!/bin/sh\\nexit 0\\n' > .venv/bin/python
  chmod +x .venv/bin/python
fi
'''


def _git(repo: Path, *args):
  subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True,
                 capture_output=True)


@needs_worker_tools
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_tpu_pod_full_launch_with_fake_gcloud(tmp_path):
  """A real (non-dry) launch on 2 fake workers: create when missing, ship the working tree, install, run, logs."""
  # A small checkout of its own: uncommitted edits and untracked files ship, ignored and deleted files do not.
  repo = tmp_path / "checkout"
  shutil.copytree(LAUNCH, repo / "launch")
  for name in ("pyproject.toml", "constraints.txt"):
    shutil.copy(ROOT / name, repo / name)
  (repo / ".gitignore").write_text(".venv/\nruns/\n")
  (repo / "jopd").mkdir()
  (repo / "jopd/__init__.py").write_text("")
  (repo / "jopd/gone.py").write_text("")
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "commit", "-q", "-m", "x")
  (repo / "jopd/__init__.py").write_text("EDITED = True\n")
  (repo / "jopd/gone.py").unlink()
  (repo / "configs").mkdir()
  (repo / "configs/new.py").write_text("")
  (repo / ".venv").mkdir()
  (repo / ".venv/huge").write_text("not shipped")

  fake_root = tmp_path / "cloud"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (fake_root / "w0").mkdir(parents=True)
  (fake_root / "w1").mkdir()
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  _write_exe(bin_dir / "uv", FAKE_UV)
  # Worker 0 has an earlier sync: a module since deleted, plus a venv, logs and a local run that must survive.
  old = fake_root / "w0/jopd"
  (old / ".venv/bin").mkdir(parents=True)
  _write_exe(old / ".venv/bin/python", "#!/bin/sh\nexit 0\n")
  (old / "jopd").mkdir()
  (old / "jopd/removed_module.py").write_text("x = 1\n")
  (old / "runs").mkdir()
  (old / "runs/keep.txt").write_text("checkpoint\n")
  (old / ".jopd-launch-files").write_text("./jopd/removed_module.py\n./pyproject.toml\n")

  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_ROOT=str(fake_root),
             FAKE_WORKERS="2", TMPDIR=str(tmp_path), SSH_AUTH_SOCK="x")
  user_cmd = ["sh", "-c", 'echo "hello from $TPU_WORKER_ID python=$(command -v python)"; exit "$TPU_WORKER_ID"']
  res = _run([repo / "launch/tpu_pod.sh", "--tpu=opd", "--zone=z1", "--run-name=r1",
              f"--log-dir={tmp_path / 'logs'}", "--", *user_cmd], env=env, cwd=tmp_path, timeout=120)
  calls = [json.loads(l) for l in (fake_root / "calls.jsonl").read_text().splitlines()]
  verbs = [c[3] for c in calls]
  assert verbs == ["describe", "create", "describe", "scp", "ssh", "ssh"], (verbs, res.stderr)
  # Worker 1's command exited 1: the launch fails.
  assert res.returncode == 1, res.stderr

  for i in (0, 1):
    synced = fake_root / f"w{i}/jopd"
    assert (synced / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert (synced / "jopd/__init__.py").read_text() == "EDITED = True\n"
    assert (synced / "configs/new.py").exists() and not (synced / "jopd/gone.py").exists()
    assert not (synced / ".venv/huge").exists()
    assert (synced / "launch/tpu_pod.sh").exists() and not (fake_root / f"w{i}/jopd-r1.tar.gz").exists()
    local_log = (tmp_path / f"logs/opd/r1/worker-{i}.log").read_text()
    assert f"hello from {i} python={synced}/.venv/bin/python" in local_log
    assert f"hello from {1 - i}" not in local_log
    assert f"hello from {i}" in (synced / f"logs/r1/worker-{i}.log").read_text()
  assert not (old / "jopd/removed_module.py").exists()
  assert (old / "runs/keep.txt").exists() and (old / ".venv/bin/python").exists()
  uv_calls = (fake_root / "uv.log").read_text().splitlines()
  assert uv_calls.count("uv pip install --python .venv/bin/python -c constraints.txt -e . jax[tpu]") == 2
  assert uv_calls.count("uv venv --python 3.11 .venv") == 1  # worker 1 had no venv; worker 0 kept its own


@needs_worker_tools
def test_tpu_pod_restarts_after_a_preemption_exit_but_not_after_a_crash(tmp_path):
  """--max-restarts: status 42 (jopd.train saved a checkpoint on SIGTERM) starts the run over; status 3 does not."""
  fake_root = tmp_path / "cloud"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for i in (0, 1):
    _fake_worker_home(fake_root, f"w{i}")
  (fake_root / "state").write_text("READY")
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_ROOT=str(fake_root),
             FAKE_WORKERS="2", TMPDIR=str(tmp_path), SSH_AUTH_SOCK="x")
  user_cmd = ["sh", "-c", 'if [ -e "$HOME/ran" ]; then echo resumed; exit 3; fi; touch "$HOME/ran"; exit 42']
  res = _run([TPU_POD, "--tpu=opd", "--zone=z1", "--run-name=r1", "--skip-setup", "--max-restarts=5",
              f"--log-dir={tmp_path / 'logs'}", "--", *user_cmd], env=env, timeout=120)
  assert res.returncode == 3, res.stderr
  verbs = [json.loads(l)[3] for l in (fake_root / "calls.jsonl").read_text().splitlines()]
  assert verbs == ["describe", "ssh", "describe", "ssh"]
  assert "restart 1 of 5" in res.stderr and "restart 2" not in res.stderr
  assert "resumed" in (tmp_path / "logs/opd/r1/worker-1.log").read_text()


# ------------------------------------------------------------------------------------------------------------------
# xpk.sh
# ------------------------------------------------------------------------------------------------------------------

def test_xpk_dry_run_prebuilt_image(poisoned_path, tmp_path):
  env, marker = poisoned_path
  res = _run([XPK, "--cluster=my-cluster", "--workload=opd-1", "--tpu-type=v5p-64", "--num-slices=2",
              "--project=p", "--zone=us-east5-a", "--docker-image=gcr.io/p/jopd:1", "--max-restarts=10",
              "--grace-period=600", "--xpk-arg=--spot", "--dry-run", "--", *ECHO_ARGV, *TRICKY], env=env)
  assert res.returncode == 0, res.stderr
  assert not marker.exists()
  cmds = _commands(res.stdout)
  assert len(cmds) == 1
  command = _flag(cmds[0], "--command")
  assert cmds[0] == ["xpk", "workload", "create", "--cluster=my-cluster", "--workload=opd-1", "--tpu-type=v5p-64",
                     "--num-slices=2", "--project=p", "--zone=us-east5-a", "--docker-image=gcr.io/p/jopd:1",
                     "--max-restarts=10", "--restart-on-user-code-failure",
                     "--termination-grace-period-seconds=600", "--spot",
                     f"--command={command}"]
  # xpk runs the command as `bash -c '... (COMMAND) & PID=$! ...'`, forwarding SIGTERM to $!. Run it that way.
  wrapper = ("_sigterm() (kill -SIGTERM $! 2>/dev/null;); trap _sigterm SIGTERM; "
             f"({command}) & PID=$!; while kill -0 $PID 2>/dev/null; do sleep 0.1; done; wait $PID; exit $?")
  out = _run(["bash", "-c", wrapper], env=dict(os.environ, PYTHONUNBUFFERED="0"))
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["ARGV " + json.dumps(TRICKY)]


def test_xpk_command_gets_sigterm_through_xpk_wrapper(tmp_path):
  """The command is exec'd, so GKE's SIGTERM (forwarded by xpk to its subshell) reaches the trainer."""
  trainer = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (print('saved', flush=True), "
             "sys.exit(3))); print('up', flush=True); time.sleep(30)")
  res = _run([XPK, "--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--docker-image=gcr.io/p/i:1", "--dry-run",
              "--", sys.executable, "-c", trainer])
  command = _flag(_commands(res.stdout)[0], "--command")
  # Structurally too: whatever bash version runs it, the trainer replaces the subshell.
  assert shlex.split(command)[-4:] == ["exec", sys.executable, "-c", trainer]
  wrapper = ("_sigterm() (kill -SIGTERM $! 2>/dev/null;); trap _sigterm SIGTERM; "
             f"({command}) & PID=$!; while kill -0 $PID 2>/dev/null; do sleep 0.1; done; wait $PID; exit $?")
  proc = subprocess.Popen(["bash", "-c", wrapper], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "up"
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=15)
  assert out.strip() == "saved" and proc.returncode == 3


def test_xpk_dry_run_builds_from_a_clean_copy_and_installs(poisoned_path, tmp_path):
  env, marker = poisoned_path
  res = _run([XPK, "--cluster=c", "--workload=opd-2", "--tpu-type=v5p-64", "--extras=wandb", "--dry-run", "--",
              "python", "-m", "jopd.train", "--config.log_path=gs://b/runs/x y"], env=env)
  assert res.returncode == 0, res.stderr
  assert not marker.exists() and not (tmp_path / "jopd-xpk-opd-2").exists()
  create = _commands(res.stdout)[-1]
  script_dir = tmp_path / "jopd-xpk-opd-2"
  assert create[:7] == ["xpk", "workload", "create", "--cluster=c", "--workload=opd-2", "--tpu-type=v5p-64",
                        "--num-slices=1"]
  assert create[7:9] == ["--base-docker-image=python:3.11", f"--script-dir={script_dir}"]
  assert shlex.split(_flag(create, "--command")) == [
      "pip", "install", "--quiet", "--root-user-action=ignore", "-c", "constraints.txt", "-e", ".[wandb]", "jax[tpu]",
      "&&", "export", "PYTHONUNBUFFERED=1", "&&", "exec", "python", "-m", "jopd.train",
      "--config.log_path=gs://b/runs/x y"]
  # The script dir is a fresh copy of the checkout's files (git ls-files), not the directory with .venv in it.
  assert ["tar", "-xzf", f"{script_dir}.tar.gz", "-C", str(script_dir)] in _commands(res.stdout)


@pytest.mark.parametrize("args, message", [
    (["--workload=w", "--tpu-type=v5p-8", "--", "x"], "--cluster is required"),
    (["--cluster=c", "--tpu-type=v5p-8", "--", "x"], "--workload is required"),
    (["--cluster=c", "--workload=w", "--", "x"], "--tpu-type is required"),
    (["--cluster=c", "--workload=w", "--tpu-type=v5p-8"], "no command given"),
    (["--cluster=c", "--workload=W_1", "--tpu-type=v5p-8", "--", "x"], "--workload must be"),
    (["--cluster=c", "--workload=w", "--tpu-type=v5p-8", "--num-slices=0", "--", "x"], "--num-slices"),
])
def test_xpk_usage_errors(poisoned_path, args, message):
  env, marker = poisoned_path
  res = _run([XPK, "--dry-run", *args], env=env)
  assert res.returncode == 2 and message in res.stderr, res.stderr
  assert res.stdout == "" and not marker.exists()


# ------------------------------------------------------------------------------------------------------------------
# slurm_gpu.sbatch
# ------------------------------------------------------------------------------------------------------------------

FAKE_SCONTROL = '''
#!/bin/sh
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-07\\ngpu-node-08\\n'; fi
'''

# Runs every task of the step in turn (SLURM_PROCID, SLURM_LOCALID set), after skipping srun's own options.
FAKE_SRUN = '''
#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [ "${1#-}" != "$1" ]; do shift; done
per=${SLURM_NTASKS_PER_NODE:-1}
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit $?
done
'''

ENV_ARGV = [sys.executable, "-c",
            "import json, os, sys; print('TASK ' + json.dumps([{k: v for k, v in os.environ.items() "
            "if k.startswith('JOPD_') or k == 'CUDA_VISIBLE_DEVICES'}, sys.argv[1:]]))"]


def _slurm_env(tmp_path, srun=FAKE_SRUN, **extra):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
  _write_exe(bin_dir / "srun", srun)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOPD_", "CUDA_VISIBLE"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"),
             SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2",
             SLURM_SUBMIT_DIR=str(tmp_path))
  env.update(extra)
  return env


def _tasks(stdout):
  return [json.loads(l[5:]) for l in stdout.splitlines() if l.startswith("TASK ")]


def test_slurm_one_process_per_node_env_and_argv(tmp_path):
  res = _run(["bash", SBATCH, *ENV_ARGV, *TRICKY], env=_slurm_env(tmp_path), cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  coordinator = "gpu-node-07:24242"  # first node of the allocation, port 20000 + job id % 10000
  assert _tasks(res.stdout) == [
      [{"JOPD_COORDINATOR": coordinator, "JOPD_NUM_PROCESSES": "2", "JOPD_PROCESS_ID": str(i)}, TRICKY]
      for i in range(2)]
  assert "scontrol show hostnames gpu-node-[07-08]" in (tmp_path / "calls.log").read_text()


def test_slurm_one_process_per_gpu_narrows_visible_devices(tmp_path):
  env = _slurm_env(tmp_path, SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
                   JOPD_COORDINATOR_PORT="31337")
  res = _run(["bash", SBATCH, *ENV_ARGV], env=env, cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  tasks = _tasks(res.stdout)
  assert [t[0]["JOPD_PROCESS_ID"] for t in tasks] == [str(i) for i in range(16)]
  assert [t[0]["CUDA_VISIBLE_DEVICES"] for t in tasks] == [str(i % 8) for i in range(16)]
  assert {t[0]["JOPD_NUM_PROCESSES"] for t in tasks} == {"16"}
  assert {t[0]["JOPD_COORDINATOR"] for t in tasks} == {"gpu-node-07:31337"}


def test_slurm_default_command_is_deepmath_opd_with_a_job_scoped_log_path(tmp_path):
  srun = FAKE_SRUN.replace('"$@" || exit $?', 'printf "%s\\n" "$@" > "$FAKE_LOG.argv"')
  res = _run(["bash", SBATCH], env=_slurm_env(tmp_path, srun=srun), cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  argv = (tmp_path / "calls.log.argv").read_text().splitlines()
  assert argv[argv.index("python"):] == ["python", "-m", "jopd.train", "--config=configs/deepmath.py",
                                         "--config.log_path=runs/deepmath-opd-4242"]


def test_slurm_time_limit_stops_the_run_then_requeues(tmp_path):
  """USR1 (from --signal=B:USR1@600) -> SIGTERM to srun -> the run saves and exits -> only then scontrol requeue."""
  srun = '''
  #!/bin/bash
  echo "srun start" >> "$FAKE_LOG"
  trap 'kill $!; sleep 0.3; echo "srun got TERM, checkpoint written" >> "$FAKE_LOG"; exit 143' TERM
  sleep 30 & wait
  '''
  env = _slurm_env(tmp_path, srun=srun)
  proc = subprocess.Popen(["bash", str(SBATCH), "true"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
  log = tmp_path / "calls.log"
  deadline = time.time() + 10
  while "srun start" not in (log.read_text() if log.exists() else ""):
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGUSR1)
  out, _ = proc.communicate(timeout=15)
  lines = log.read_text().splitlines()
  assert lines == ["scontrol show hostnames gpu-node-[07-08]", "srun start", "srun got TERM, checkpoint written",
                   "scontrol requeue 4242"]
  assert proc.returncode == 143 and "srun exited with status 143" in out


# ------------------------------------------------------------------------------------------------------------------
# shellcheck
# ------------------------------------------------------------------------------------------------------------------

def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install -y shellcheck); "
                "the launch scripts were not linted")
  scripts = [TPU_POD, XPK, SBATCH, LAUNCH / "common.sh", LAUNCH.parent / "bench" / "device_check.sh"]
  res = _run([shellcheck, "--external-sources", "--severity=style", *scripts])
  assert res.returncode == 0, res.stdout + res.stderr
