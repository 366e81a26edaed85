# Shared by scripts/run-local and scripts/test: make sure Redis and PostgreSQL are reachable, starting
# (or, as root on Debian/Ubuntu, installing) local ones when they are not. Sourced, not run.

SPARKY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$SPARKY_ROOT/.run"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# host and port of a redis:// or postgres:// URL (defaults when absent)
url_host() { local u="${1#*://}"; u="${u##*@}"; u="${u%%/*}"; u="${u%%\?*}"; local h="${u%%:*}"; echo "${h:-127.0.0.1}"; }
url_port() { local u="${1#*://}"; u="${u##*@}"; u="${u%%/*}"; u="${u%%\?*}"; if [[ "$u" == *:* ]]; then echo "${u##*:}"; else echo "$2"; fi; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

is_local() { [[ "$1" == 127.* || "$1" == localhost || "$1" == "::1" ]]; }

wait_port() {
  local i; for i in $(seq 1 100); do port_open "$1" "$2" && return 0; sleep 0.2; done; return 1
}

apt_install() {
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing $* with apt-get"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}

load_env() {
  if [[ -f "$SPARKY_ROOT/.env" ]]; then
    set -a; # shellcheck disable=SC1091
    source "$SPARKY_ROOT/.env"; set +a
  fi
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
  export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/sparky}"
}

ensure_redis() {
  local host port; host=$(url_host "$REDIS_URL"); port=$(url_port "$REDIS_URL" 6379)
  port_open "$host" "$port" && return 0
  is_local "$host" || die "Redis at $host:$port is not reachable (REDIS_URL=$REDIS_URL)"
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server || die "Redis is not running on $host:$port and redis-server is not installed.
  Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) and run this again,
  or set REDIS_URL to a running Redis."
  fi
  mkdir -p "$RUN_DIR/redis"
  say "starting redis-server on $port (data in .run/redis, AOF on)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$RUN_DIR/redis" \
    --appendonly yes --maxmemory-policy noeviction --logfile "$RUN_DIR/redis/redis.log" >/dev/null
  wait_port "$host" "$port" || die "redis-server did not come up; see .run/redis/redis.log"
}

pg_bindir() {
  local d; for d in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin /opt/homebrew/bin /usr/local/bin /usr/bin; do
    [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_postgres() {
  local host port; host=$(url_host "$DATABASE_URL"); port=$(url_port "$DATABASE_URL" 5432)
  port_open "$host" "$port" && return 0
  is_local "$host" || die "PostgreSQL at $host:$port is not reachable (DATABASE_URL=$DATABASE_URL)"
  if [[ $(id -u) -eq 0 ]]; then
    if ! command -v pg_ctlcluster >/dev/null || [[ -z "$(ls /etc/postgresql 2>/dev/null)" ]]; then
      apt_install postgresql || die "PostgreSQL is not installed and apt-get is not available: install PostgreSQL, or set DATABASE_URL"
    fi
    local ver; ver=$(ls /etc/postgresql | sort -V | tail -n1)
    local hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if ! grep -q '# sparky-local' "$hba"; then
      # Local development only: trust connections from this machine, like the CI machines do.
      say "allowing passwordless local connections in $hba (local development)"
      sed -i '1i host all all 127.0.0.1/32 trust # sparky-local\nhost all all ::1/128 trust # sparky-local' "$hba"
    fi
    say "starting PostgreSQL $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main start
  else
    local bin; bin=$(pg_bindir) || die "PostgreSQL is not running on $host:$port and is not installed.
  Install it (Debian/Ubuntu: sudo apt-get install postgresql; macOS: brew install postgresql) and run this again,
  or set DATABASE_URL to a running server."
    local data="$RUN_DIR/pgdata"
    if [[ ! -f "$data/PG_VERSION" ]]; then
      say "creating a local PostgreSQL cluster in .run/pgdata"
      "$bin/initdb" -D "$data" -U postgres -A trust >/dev/null
    fi
    say "starting PostgreSQL on $port (data in .run/pgdata)"
    "$bin/pg_ctl" -D "$data" -l "$data/server.log" -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
  fi
  wait_port "$host" "$port" || die "PostgreSQL did not come up"
}

ensure_services() {
  load_env
  ensure_redis
  ensure_postgres
}
