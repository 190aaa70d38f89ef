"""Team mode: PostgreSQL with an MLflow tracking server and a Prefect server on it, all on 127.0.0.1.

    python -m posttrain.tools.team up        # start the three (the first `up` creates the database cluster)
    eval "$(python -m posttrain.tools.team env)"   # MLFLOW_TRACKING_URI and PREFECT_API_URL for this shell
    python -m posttrain.tools.team status    # each service: running or not, its URL
    python -m posttrain.tools.team down      # stop them; the state stays for the next `up`

Everything lives under one folder (`.team/` at the repo root unless `--state`): `postgres/` (the cluster),
`artifacts/` (MLflow's artifact store, served through the MLflow server), `prefect/` (PREFECT_HOME), `logs/`
and `team.json` (ports, password, process ids; mode 0600). Ports are chosen at the first `up` (the defaults
if free, else any free one) and kept. Needs PostgreSQL's server binaries (`make install-team`: Debian's
postgresql) and the `team` extra (psycopg2-binary for MLflow; asyncpg for Prefect comes with prefect).
PostgreSQL refuses to run as root: as root it runs as the `postgres` user, which must be able to reach the
state folder. docs/team.md has the whole story.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STATE = ".team"
DEFAULT_PORTS = {"postgres": 5433, "mlflow": 5000, "prefect": 4200}
USER = "team"
DATABASES = ("mlflow", "prefect")
PG_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/opt/postgresql*/bin")


class TeamError(RuntimeError):
    pass


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl): $PG_BIN, the PATH, else Debian's
    /usr/lib/postgresql/<newest>/bin. None where there is none."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").exists():
        return Path(found).resolve().parent
    import glob

    for pattern in PG_SEARCH:
        dirs = [Path(d) for d in glob.glob(pattern) if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()]
        if dirs:
            return max(dirs, key=lambda d: [int(p) if p.isdigit() else 0 for p in d.parent.name.split(".")])
    return None


def missing() -> str:
    """Why team mode cannot start here ('' if it can): no PostgreSQL binaries, or no psycopg2 for MLflow."""
    if pg_bin() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin: "
                "`make install-team` (apt-get install postgresql, as root) or set PG_BIN")
    for module, pip in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg")):
        try:
            __import__(module)
        except ImportError:
            return f"no {module} (MLflow and Prefect talk to PostgreSQL through it): pip install -e '.[team]'"
    return ""


def _free_ports(preferred: dict[str, int]) -> dict[str, int]:
    """name -> a port free on 127.0.0.1 now: the preferred one if free, else any (0: any); all distinct."""
    held, out = [], {}
    try:
        for name, port in preferred.items():
            for p in (port, 0):
                s = socket.socket()
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    s.close()
                    continue
                held.append(s)
                out[name] = s.getsockname()[1]
                break
            else:
                raise TeamError("no free port on 127.0.0.1")
    finally:
        for s in held:
            s.close()
    return out


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (ours, not yet reaped) is not running
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _ours(pid: int, needle: str) -> bool:
    """Is `pid` still the process we started (its command line names `needle`), not a reused pid?"""
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return _alive(pid)  # no /proc: trust the pid


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


@dataclass
class Team:
    """The services of one state folder. `ports` given here apply at the first `up` only (0: any free port)."""

    state: Path = Path(STATE)
    ports: dict[str, int] = field(default_factory=dict)
    ui: bool = True  # serve Prefect's web UI too

    def __post_init__(self):
        self.state = Path(self.state).resolve()
        self.file = self.state / "team.json"

    # ---------------------------------------------------------------- the saved facts

    def info(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.exists() else {}

    def _save(self, info: dict) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(self.file)

    def _setup(self) -> dict:
        info = self.info()
        if not info:
            wanted = {**DEFAULT_PORTS, **self.ports}
            info = {"ports": _free_ports(wanted), "user": USER, "password": secrets.token_urlsafe(18), "pids": {}}
            self._save(info)
        return info

    def urls(self, info: dict | None = None) -> dict[str, str]:
        info = info or self.info()
        p, user, pw = info["ports"], info["user"], info["password"]
        db = f"{user}:{pw}@127.0.0.1:{p['postgres']}"
        return {
            "mlflow": f"http://127.0.0.1:{p['mlflow']}",
            "prefect": f"http://127.0.0.1:{p['prefect']}/api",
            "mlflow_db": f"postgresql+psycopg2://{db}/mlflow",  # SQLAlchemy 2.1's plain postgresql:// means psycopg 3
            "prefect_db": f"postgresql+asyncpg://{db}/prefect",
        }

    def env(self) -> dict[str, str]:
        """What a shell or a process needs to run the lifecycle against the team's services."""
        urls = self.urls()
        return {"MLFLOW_TRACKING_URI": urls["mlflow"], "PREFECT_API_URL": urls["prefect"]}

    # ---------------------------------------------------------------- PostgreSQL

    @property
    def pgdata(self) -> Path:
        return self.state / "postgres"

    def _pg_user(self) -> dict:
        """subprocess kwargs: as root, run as the `postgres` user (PostgreSQL refuses root)."""
        if os.geteuid() != 0:
            return {}
        import grp
        import pwd

        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(name)
                return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                        "_name": name, "_group": grp.getgrgid(pw.pw_gid).gr_name}
        raise TeamError("running as root and there is no `postgres` user for PostgreSQL to run as")

    def _check_reachable(self, as_user: dict) -> None:
        """Every folder above the cluster must let the postgres user through (o+x), or PostgreSQL cannot start."""
        if not as_user:
            return
        for parent in [self.state, *self.state.parents]:
            st = parent.stat()
            if st.st_uid == as_user["user"] or st.st_mode & 0o001 or (st.st_gid == as_user["group"] and st.st_mode & 0o010):
                continue
            raise TeamError(
                f"PostgreSQL runs as the `{as_user['_name']}` user here (it refuses root), and that user cannot enter "
                f"{parent} (mode {oct(st.st_mode & 0o777)}). Put the state elsewhere (--state /srv/team) or "
                f"`chmod o+x {parent}`.")

    def _pg(self, tool: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        as_user = {k: v for k, v in self._pg_user().items() if not k.startswith("_")}
        proc = subprocess.run([str(pg_bin() / tool), *args], capture_output=True, text=True, **as_user, **kw)
        if check and proc.returncode:
            raise TeamError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def _chown(self, path: Path, as_user: dict) -> None:
        if as_user:
            os.chown(path, as_user["user"], as_user["group"])

    def _init_postgres(self, info: dict) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        as_user = self._pg_user()
        self._check_reachable(as_user)
        if self.pgdata.exists():  # a half-made cluster from an interrupted first `up`
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        self._chown(self.pgdata, as_user)
        pwfile = self.state / "pwfile"
        pwfile.write_text(info["password"] + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile, as_user)
        try:
            self._pg("initdb", "-D", str(self.pgdata), "-U", info["user"], f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "-E", "UTF8", "--locale=C")
        finally:
            pwfile.unlink()
        with open(self.pgdata / "postgresql.conf", "a") as conf:  # TCP on loopback only, no unix socket
            conf.write(f"\n# posttrain.tools.team\nlisten_addresses = '127.0.0.1'\nport = {info['ports']['postgres']}\n"
                       "unix_socket_directories = ''\n")

    def _postgres_running(self, info: dict) -> bool:
        return self.pgdata.exists() and self._pg("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def _start_postgres(self, info: dict) -> None:
        if self._postgres_running(info):
            return
        log = self.state / "logs" / "postgres.log"
        log.touch()
        self._chown(log, self._pg_user())
        self._pg("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(log), "-w", "-t", "120")
        env = dict(os.environ, PGPASSWORD=info["password"])
        host = ["-h", "127.0.0.1", "-p", str(info["ports"]["postgres"]), "-U", info["user"]]
        have = self._pg("psql", *host, "-d", "postgres", "-Atc", "select datname from pg_database", env=env).stdout.split()
        for db in DATABASES:
            if db not in have:
                self._pg("createdb", *host, db, env=env)

    # ---------------------------------------------------------------- MLflow and Prefect

    def _commands(self, info: dict) -> dict[str, tuple[list[str], dict[str, str], str]]:
        """name -> (command, environment, health URL)."""
        urls, ports, bin_ = self.urls(info), info["ports"], Path(sys.executable).parent
        mlflow = [str(bin_ / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1"]
        prefect = [str(bin_ / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])]
        if not self.ui:
            prefect.append("--no-ui")
        # Neither server may take a client's settings from this shell (a team URI set by `env` earlier, say).
        base = {k: v for k, v in os.environ.items()
                if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME")}
        mlflow_env = dict(base, MLFLOW_BACKEND_STORE_URI=urls["mlflow_db"],  # in the environment: no password in `ps`
                          MLFLOW_ARTIFACTS_DESTINATION=(self.state / "artifacts").as_uri())
        # MLflow 3's job runner (huey consumers for its GenAI scorers and trace jobs; about 0.5 GB and half a
        # minute of start-up here): off unless asked for (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true)
        mlflow_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        prefect_env = dict(base, PREFECT_HOME=str(self.state / "prefect"),
                           PREFECT_API_DATABASE_CONNECTION_URL=urls["prefect_db"],
                           PREFECT_SERVER_ANALYTICS_ENABLED="false",
                           PREFECT_UI_API_URL=urls["prefect"])
        return {
            "mlflow": (mlflow, mlflow_env, urls["mlflow"] + "/health"),
            "prefect": (prefect, prefect_env, urls["prefect"] + "/health"),
        }

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> int:
        log = open(self.state / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, cwd=self.state, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # its own group: `down` stops it all
        log.close()
        return proc.pid

    def _running(self, info: dict, name: str) -> bool:
        pid = info.get("pids", {}).get(name)
        return bool(pid) and _alive(pid) and _ours(pid, name)

    # ---------------------------------------------------------------- the commands

    def up(self, timeout: float = 180.0) -> dict[str, str]:
        """Start whatever is not running and wait until all answer; return the URLs. Idempotent."""
        self.start()
        return self.wait(timeout)

    def start(self) -> None:
        """PostgreSQL up (created at the first start), the MLflow and Prefect servers launched; returns without
        waiting for those two to answer (`wait`), so a caller can do other work while they import."""
        why = missing()
        if why:
            raise TeamError(why)
        self.state.mkdir(parents=True, exist_ok=True)
        if not (self.state / ".gitignore").exists():  # the database, artifacts and a password: never for git
            (self.state / ".gitignore").write_text("*\n")
        (self.state / "logs").mkdir(exist_ok=True)
        (self.state / "artifacts").mkdir(exist_ok=True)
        info = self._setup()
        self._init_postgres(info)
        self._start_postgres(info)
        for name, (cmd, env, _) in self._commands(info).items():
            if not self._running(info, name):
                info["pids"][name] = self._spawn(name, cmd, env)
        self._save(info)

    def wait(self, timeout: float = 180.0) -> dict[str, str]:
        """Until the MLflow and Prefect servers answer their health checks; on failure stop everything, say why."""
        info = self.info()
        deadline = time.monotonic() + timeout
        try:
            for name, (_, _, health) in self._commands(info).items():
                log = self.state / "logs" / f"{name}.log"
                while not _http_ok(health):
                    if not self._running(info, name):
                        raise TeamError(f"the {name} server exited; the end of {log}:\n{_tail(log)}")
                    if time.monotonic() > deadline:
                        raise TeamError(f"the {name} server did not answer {health} within {timeout:.0f} s; "
                                        f"the end of {log}:\n{_tail(log)}")
                    time.sleep(0.5)
        except BaseException:
            self.down()  # nothing half-up left behind
            raise
        return self.urls(info)

    def down(self, timeout: float = 30.0) -> None:
        """Stop the MLflow and Prefect servers (together), then PostgreSQL. The state folder stays."""
        info = self.info()
        if not info:
            return
        groups = [pid for name, pid in info.get("pids", {}).items() if pid and self._running(info, name)]
        _stop_groups(groups, timeout)
        info["pids"] = {}
        self._save(info)
        if self._postgres_running(info):
            self._pg("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(int(timeout)))

    def status(self) -> dict[str, dict]:
        info = self.info()
        if not info:
            return {}
        urls = self.urls(info)
        out = {"postgres": {"running": self._postgres_running(info),
                            "url": f"postgresql://{info['user']}@127.0.0.1:{info['ports']['postgres']}"}}
        for name, (_, _, health) in self._commands(info).items():
            out[name] = {"running": self._running(info, name) and _http_ok(health), "url": urls[name],
                         "pid": info.get("pids", {}).get(name)}
        return out


def _stop_groups(pids: list[int], timeout: float) -> None:
    """SIGTERM the process groups the `pids` lead (each server and the workers it forked), SIGKILL what outlives
    `timeout`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (tests start them in-process)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                left.remove(pid)
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.tools.team", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state", default=os.environ.get("TEAM_STATE", STATE),
                        help="the folder holding the database, artifacts, logs and team.json (default .team)")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port,
                            help=f"first `up` only; 0 = any free port (default {port}, or a free one if taken)")
    parser.add_argument("--no-ui", action="store_true", help="start the Prefect server without its web UI")
    args = parser.parse_args(argv)
    team = Team(Path(args.state), ports={n: getattr(args, f"{n}_port") for n in DEFAULT_PORTS}, ui=not args.no_ui)
    try:
        if args.command == "up":
            start = time.monotonic()
            urls = team.up()
            print(f"team services up in {time.monotonic() - start:.1f} s (state: {team.state})", file=sys.stderr)
            print(f"  MLflow:  {urls['mlflow']}\n  Prefect: {urls['prefect'].removesuffix('/api')}", file=sys.stderr)
            print("run the lifecycle against them with:", file=sys.stderr)
        elif args.command == "down":
            team.down()
            print(f"team services stopped (state kept in {team.state})", file=sys.stderr)
            return 0
        elif args.command == "status":
            status = team.status()
            if not status:
                print(f"no team state in {team.state}: python -m posttrain.tools.team up", file=sys.stderr)
                return 1
            for name, s in status.items():
                print(f"{name:9} {'running' if s['running'] else 'stopped':8} {s['url']}")
            return 0 if all(s["running"] for s in status.values()) else 3
        if not team.info():
            print(f"no team state in {team.state}: python -m posttrain.tools.team up", file=sys.stderr)
            return 1
        for key, value in team.env().items():  # up and env
            print(f"export {key}={value}")
        return 0
    except TeamError as e:
        print(f"team: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
