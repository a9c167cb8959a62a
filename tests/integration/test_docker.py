"""The Docker image for real: built offline, trained in one container, served from another.

The base image is a minimal Debian with ``python3`` and ``python3-venv``, made with
``debootstrap`` and ``docker import`` (no image registry is needed), and the image installs
from a wheelhouse made on this machine with ``docker/wheelhouse.sh``, so the build needs no
network. Both are cached across runs: the base image by its tag, the wheelhouse in
``~/.cache/barkgpt-docker`` (remade only when barkgpt's runtime requirements change), and
Docker's layer cache keeps the dependency layer, so a warm run only rebuilds the barkgpt layer.

Skips, with the reason, where ``docker`` cannot reach a running ``dockerd`` (``.ci/run``
installs and starts it when it runs as root), or the base image is missing and cannot be made
(``debootstrap`` needs root and Debian's mirror). ``BARKGPT_TEST_BASE_IMAGE`` names another base
image to use instead (a Python image of this machine's Python version, with venv).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "barkgpt-docker"
SUITES = {(3, 11): "bookworm", (3, 13): "trixie"}  # Debian releases whose python3 matches the host's wheels
TORCH = "torch==2.13.0+cpu"
WHEELHOUSE = "docker/wheelhouse/test"  # inside the build context; a fixed path keeps the layer cache
IMAGE = "barkgpt:test"
BARKS = {"woof", "arf", "ruff", "grrr", "yip", "bark"}
GRACE_S = 10  # docker stop's default grace period; the image's CMD drains for 8 s


def docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``docker ARGS``; on failure (with ``check``) fail the test with its output."""
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} ... exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def base_image() -> str:
    """The base image's tag: ``BARKGPT_TEST_BASE_IMAGE``, else a debootstrap Debian made once."""
    if os.environ.get("BARKGPT_TEST_BASE_IMAGE"):
        return os.environ["BARKGPT_TEST_BASE_IMAGE"]
    suite = SUITES.get(sys.version_info[:2])
    if suite is None:
        pytest.skip(f"no Debian release ships Python {sys.version.split()[0]}, the Python the wheelhouse is made for")
    tag = f"barkgpt-test-base:{suite}"
    if docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip(f"the base image {tag} is missing and making it needs root and debootstrap (apt-get install debootstrap)")
    root = CACHE / f"rootfs-{suite}"
    shutil.rmtree(root, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", suite, str(root), "http://deb.debian.org/debian"]
    made = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"debootstrap {suite} failed (no Debian mirror?): {made.stdout.strip().splitlines()[-1:]}")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(root / junk, ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    docker("import", "-", tag, stdin=tar.stdout, timeout=300)
    assert tar.wait() == 0
    shutil.rmtree(root, ignore_errors=True)
    return tag


def wheelhouse() -> Path:
    """``~/.cache/barkgpt-docker/wheelhouse-cpXY``, remade by docker/wheelhouse.sh when barkgpt's
    runtime requirements change (a stamp holds their hash); then hard-linked into the build
    context at ``WHEELHOUSE`` (the caller removes it)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = "\n".join([TORCH, *project["dependencies"], *project["optional-dependencies"]["serve"]])
    cache = CACHE / f"wheelhouse-cp{sys.version_info[0]}{sys.version_info[1]}"
    stamp = cache / "requirements.sha256"
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        env = {**os.environ, "PYTHON": sys.executable, "TORCH": TORCH}
        made = subprocess.run(
            [str(REPO / "docker/wheelhouse.sh"), str(cache)], env=env, capture_output=True, text=True, timeout=900
        )
        if made.returncode != 0:
            pytest.skip(f"docker/wheelhouse.sh could not make the wheels (no package index?): {made.stderr.strip()[-500:]}")
        stamp.write_text(digest)
    dest = REPO / WHEELHOUSE
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for wheel in cache.glob("*.whl"):
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:  # another file system
            shutil.copy2(wheel, dest / wheel.name)
    return dest


@pytest.fixture(scope="module")
def image():
    """``barkgpt:test``, built from the debootstrap base and the wheelhouse; skips without Docker."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command (apt-get install docker.io; .ci/run does it as root)")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"docker cannot reach dockerd (start it as root: dockerd &; .ci/run does): {info.stderr.strip()[-300:]}")
    base = base_image()
    wheels = wheelhouse()
    try:
        args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"WHEELHOUSE={WHEELHOUSE}"]
        docker("build", *args, "-t", IMAGE, str(REPO), timeout=1800)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    yield IMAGE


@pytest.fixture(scope="module")
def runs_volume(image):
    """A Docker volume holding ``bark/``: the Bark preset trained in a container of the image."""
    volume = f"barkgpt-test-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", volume)
    try:
        # One OpenMP thread: on a shared 2-core machine spinning threads make a tiny model slower.
        train = ["--preset", "bark", "--out-dir", "/runs/bark", "--max-iters", "200", "--eval-interval", "100"]
        out = docker("run", "--rm", "-e", "OMP_NUM_THREADS=1", "-v", f"{volume}:/runs", image, "train", *train, timeout=600)
        assert "done: step 200" in out.stdout, out.stdout + out.stderr
        yield volume
    finally:
        docker("volume", "rm", "-f", volume, check=False)


def test_image_is_under_1_2_gb(image):
    """The CPU image stays small: under 1.2 GB uncompressed (1.10 GB on the debootstrap base)."""
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size < 1.2e9, f"{image} is {size / 1e9:.2f} GB"


def wait_health(base: str, deadline_s: float) -> None:
    """Poll ``base/health`` until it answers 200; fail after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            pytest.fail(f"{base}/health did not answer 200 within {deadline_s} s")
        time.sleep(0.5)


def test_image_serves_a_model_trained_in_a_container(image, runs_volume):
    """The default CMD serves /runs/bark on 0.0.0.0:8000 as a non-root user: /health, the
    image's HEALTHCHECK, a chat completion through the openai client, then ``docker stop``
    ends it with exit 0 inside the grace period."""
    name = f"barkgpt-test-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "-e", "OMP_NUM_THREADS=1", "-p", "127.0.0.1::8000", "-v", f"{runs_volume}:/runs", image)
    try:
        port = docker("port", name, "8000").stdout.strip().splitlines()[0].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        wait_health(base, 180)

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["bark"]
        reply = client.chat.completions.create(
            model="bark", messages=[{"role": "user", "content": "speak"}], max_tokens=8, temperature=0
        )
        words = reply.choices[0].message.content.split()
        assert words and set(words) <= BARKS, reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0

        uid = docker("exec", name, "grep", "^Uid:", "/proc/1/status").stdout.split()[1]  # the server is process 1
        assert uid != "0", "the server runs as root in the container"
        assert docker("inspect", "-f", "{{.Config.User}}", name).stdout.strip() == "barkgpt"

        end = time.monotonic() + 60  # the HEALTHCHECK runs every 10 s
        while (health := docker("inspect", "-f", "{{json .State.Health}}", name).stdout) and '"healthy"' not in health:
            assert time.monotonic() < end, f"the HEALTHCHECK never passed: {health}"
            time.sleep(1)

        started = time.monotonic()
        docker("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
        took = time.monotonic() - started
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after docker stop:\n{docker('logs', name).stderr[-2000:]}"
        assert took < GRACE_S, f"docker stop took {took:.1f} s: the server did not drain on SIGTERM within the grace period"
    finally:
        docker("rm", "-f", name, check=False)
