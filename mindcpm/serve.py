"""An OpenAI-compatible HTTP server: every client shares one continuous-batching engine.

    python -m mindcpm.serve --model /path/to/MiniCPM4-0.5B [--host 127.0.0.1] [--port 8000]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming as server-sent events
ending with [DONE]), /health, /metrics (Prometheus). The graphs of a lone request and of a full
batch are compiled before the port accepts traffic. A client that disconnects has its request
aborted; invalid requests get an OpenAI-shaped 400; when --max-num-seqs requests run and
--max-waiting more wait, further ones get 503. With --tp N, msrun starts N ranks; rank 0 serves
HTTP and the others run the steps it sends.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

if __name__ == "__main__":
    # As generate.py: before MindSpore starts (see mindcpm/cli.py).
    os.environ.setdefault("GLOG_v", "3")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

from . import cli  # noqa: E402

DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_WAITING = 64


def parse_args(argv):
    p = cli.ArgumentParser(prog="python -m mindcpm.serve", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one, printed at start)")
    g.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model name clients send (default: --model as given, or 'default')")
    g.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                   help=f"requests allowed to wait for a batch slot before new ones get 503 ({DEFAULT_MAX_WAITING})")
    cli.add_model_args(p, max_num_seqs_help=f"most requests batched together ({DEFAULT_MAX_NUM_SEQS})")
    cli.add_parallel_args(p)
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting < 0:
        p.error(f"--max-waiting must be >= 0, got {args.max_waiting}")
    return args


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def main_(argv) -> int:
    args = parse_args(argv)
    cli.check_engine_args(args)
    cli.launch_ranks(args, argv)
    cli.prepare_environment()
    import uvicorn
    from .engine.serving import EngineLoop
    from .server_app import build_app

    llm = cli.llm_from_args(args, max_num_seqs=DEFAULT_MAX_NUM_SEQS)  # other ranks stay in here
    sock = listen(args.host, args.port)
    engine = EngineLoop(llm, args.max_waiting)
    engine.start()  # compiles before the port is served
    name = args.served_model_name or args.model or "default"
    app = build_app(llm, engine, name, cli.generation_defaults(llm.model_path))
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port} (max_model_len {llm.max_model_len})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0


def spawn(argv: list[str], timeout: float = 300.0, **popen_kw):
    """Runs `python -m mindcpm.serve ARGV --port 0` in a subprocess (tests, benchmarks); returns
    (process, base URL) once it serves. Its stderr keeps being drained so it never blocks."""
    import subprocess
    import threading
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(popen_kw.pop("env", os.environ), PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "mindcpm.serve", *argv, "--port", "0"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen_kw)
    lines: list[str] = []
    started = threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                started.set()
        started.set()  # the process ended

    threading.Thread(target=drain, daemon=True).start()
    if not started.wait(timeout) or proc.poll() is not None:
        stop(proc)
        raise RuntimeError("the server did not start:\n" + "".join(lines[-20:]))
    return proc, next(line for line in lines if line.startswith("serving ")).split()[3]


def stop(proc) -> None:
    """Ends a spawned server: SIGTERM (uvicorn shuts down gracefully), then SIGKILL after 30 s."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main(argv=None) -> int:
    return cli.run(main_, argv)


if __name__ == "__main__":
    sys.exit(main())
