#!/bin/bash
# Runs inside a throw-away container booted by real systemd (tests/packaging.sh starts it with
# `systemd-nspawn --volatile=yes`: the host's /usr with the imgsrv package installed, an empty
# /etc and /var). It starts the installed units the way an operator does and checks what the
# offline analysis cannot: readiness (Type=notify), the dynamic user and sandbox really applied,
# both listening modes, the TLS drop-in, Conflicts=, Restart=on-failure and a clean stop.
# Writes PASS or FAIL lines to /ct/result; the transcript goes to /ct/transcript.
exec >/ct/transcript 2>&1
set -u
failures=0
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
prop() { systemctl show -p "$2" --value "$1"; }
http() { curl -sS -k -o /dev/null -w '%{http_code}' --max-time 10 "$1" 2>/dev/null; }
stopped_cleanly() { # the unit stopped on SIGTERM with exit status 0
  [ "$(prop "$1" ActiveState)" = inactive ] && [ "$(prop "$1" Result)" = success ] &&
    [ "$(prop "$1" ExecMainStatus)" = 0 ]
}
sandboxed() { # PID: no capabilities, no_new_privs, a seccomp filter, a non-root user
  local s=/proc/$1/status
  grep -q '^CapEff:[[:space:]]*0000000000000000$' "$s" && grep -q '^CapBnd:[[:space:]]*0000000000000000$' "$s" &&
    grep -q '^NoNewPrivs:[[:space:]]*1$' "$s" && grep -q '^Seccomp:[[:space:]]*2$' "$s" &&
    ! grep -q '^Uid:[[:space:]]*0[[:space:]]' "$s"
}
only_loopback() { # PID's network namespace has no interface but lo
  # (No awk here: it is an /etc/alternatives link, and this container's /etc is empty.)
  [ "$(sed -n '3,$p' "/proc/$1/net/dev" | cut -d: -f1 | tr -d ' ')" = lo ]
}

systemctl --version | head -n1

echo "== imgsrv.service"
check "imgsrv.service starts (READY=1 received)" systemctl start imgsrv.service
check "imgsrv.service is running" [ "$(prop imgsrv.service SubState)" = running ]
pid=$(prop imgsrv.service MainPID)
check "GET /healthz on 127.0.0.1:8080 answers 204" [ "$(http http://127.0.0.1:8080/healthz)" = 204 ]
check "the metrics listener answers on 127.0.0.1:9464" [ "$(http http://127.0.0.1:9464/metrics)" = 200 ]
check "runs as a dynamic user without capabilities, with no_new_privs and seccomp" sandboxed "$pid"
check "the database and token are in the state directory, not owned by root" \
  bash -c '[ -s /var/lib/imgsrv/bootstrap-token ] && [ -f /var/lib/imgsrv/imgsrv.redb ] &&
           [ "$(stat -c %u /var/lib/private/imgsrv/imgsrv.redb)" != 0 ]'
# /etc is writable in this container, so a failed write from the service's mount namespace
# shows ProtectSystem=strict at work.
check "/etc is writable here but read-only to imgsrv (ProtectSystem=strict)" \
  bash -c "touch /etc/probe && rm /etc/probe && ! nsenter -t $pid -m touch /etc/probe 2>/dev/null"
restarted() {
  local i
  for i in $(seq 50); do
    [ "$(prop imgsrv.service NRestarts)" = 1 ] && systemctl is-active -q imgsrv.service && return 0
    sleep 0.2
  done
  return 1
}
systemctl kill -s KILL imgsrv.service
check "Restart=on-failure restarts it after SIGKILL" restarted
check "it serves again after the restart" [ "$(http http://127.0.0.1:8080/healthz)" = 204 ]
systemctl stop imgsrv.service
check "systemctl stop: SIGTERM, exit status 0" stopped_cleanly imgsrv.service

echo "== imgsrv.socket"
check "imgsrv.socket starts" systemctl start imgsrv.socket
check "nothing runs before the first connection" [ "$(prop imgsrv-socket.service ActiveState)" = inactive ]
check "GET /healthz on 127.0.0.1:443 answers 204" [ "$(http http://127.0.0.1:443/healthz)" = 204 ]
check "GET /healthz on [::1]:443 answers 204" [ "$(http 'http://[::1]:443/healthz')" = 204 ]
pid=$(prop imgsrv-socket.service MainPID)
check "imgsrv-socket.service is running" [ "$(prop imgsrv-socket.service SubState)" = running ]
check "runs sandboxed" sandboxed "$pid"
check "has no network but loopback (PrivateNetwork=yes)" only_loopback "$pid"
check "gets an empty --metrics-listen argument" \
  grep -qF -- "--metrics-listen"$'\x01\x01' <(tr '\0' '\1' <"/proc/$pid/cmdline"; printf '\1')
check "no metrics listener in this mode" [ "$(http http://127.0.0.1:9464/metrics)" = 000 ]
check "starting imgsrv.service stops the socket mode (Conflicts=)" systemctl start imgsrv.service
check "... the socket is stopped" [ "$(prop imgsrv.socket ActiveState)" = inactive ]
check "... its service is stopped cleanly" stopped_cleanly imgsrv-socket.service
check "and back: starting imgsrv.socket stops imgsrv.service" systemctl start imgsrv.socket
check "... imgsrv.service is stopped cleanly" stopped_cleanly imgsrv.service
check "... and the socket mode serves" [ "$(http http://127.0.0.1:443/healthz)" = 204 ]
systemctl stop imgsrv.socket imgsrv-socket.service

echo "== TLS drop-in"
install -d -m 0700 /etc/imgsrv
install -m 0600 /ct/tls.crt /ct/tls.key /etc/imgsrv/
for unit in imgsrv.service imgsrv-socket.service; do
  install -D -m 0644 /usr/share/doc/imgsrv/examples/tls.conf "/etc/systemd/system/$unit.d/tls.conf"
done
systemctl daemon-reload
check "imgsrv.service starts with TLS" systemctl start imgsrv.service
check "HTTPS on 127.0.0.1:8080 answers 204" [ "$(http https://127.0.0.1:8080/healthz)" = 204 ]
systemctl stop imgsrv.service
systemctl start imgsrv.socket
check "HTTPS on 127.0.0.1:443 (socket mode) answers 204" [ "$(http https://127.0.0.1:443/healthz)" = 204 ]
systemctl stop imgsrv.socket imgsrv-socket.service
check "the socket-activated service stopped cleanly" stopped_cleanly imgsrv-socket.service
rm /etc/imgsrv/tls.key
check "with the drop-in but no key, the unit fails to start" bash -c '! systemctl start imgsrv.service 2>/dev/null'
systemctl stop imgsrv.service

for unit in imgsrv.service imgsrv-socket.service; do
  echo "--- journal of $unit"
  journalctl -u "$unit" --no-pager -o cat | tail -n 12
done
if [ "$failures" = 0 ]; then echo PASS >/ct/result; else echo "FAIL $failures" >/ct/result; fi
