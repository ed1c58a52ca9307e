#!/usr/bin/env bash
# Debian packages the test suite drives as real clients and filters:
# curl, fetchmail and mpop (POP3 clients, also over TLS), openssl (s_client for STLS), spamassassin/spamc and renattach (filters),
# dovecot-pop3d (the real Dovecot a migration test serves a Maildir tree with first), haproxy (the PROXY protocol tests),
# postgresql (the shared store: the tests run initdb/pg_ctl, found in /usr/lib/postgresql/*/bin),
# dovecot-core (doveadm pw makes and checks the password scheme vectors; libcrypt1 comes with it),
# gcc and libc6-dev (the benchmark's C load client, loadtest/popload.c, is compiled on demand by its tests and the bench).
# valgrind (loadtest.instructions counts instructions per session under callgrind; its test runs it briefly).
# Installs only what is missing; uses sudo when not root.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v fetchmail >/dev/null || need+=(fetchmail)
command -v mpop >/dev/null || need+=(mpop)
command -v openssl >/dev/null || need+=(openssl)
command -v spamassassin >/dev/null || need+=(spamassassin)
command -v spamc >/dev/null || need+=(spamc)
command -v renattach >/dev/null || need+=(renattach)
command -v doveadm >/dev/null || need+=(dovecot-core)
command -v haproxy >/dev/null || need+=(haproxy)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v dovecot >/dev/null || need+=(dovecot-pop3d)
command -v cc >/dev/null || need+=(gcc)
command -v valgrind >/dev/null || need+=(valgrind)
compgen -G "/usr/include/*/sys/epoll.h" >/dev/null || compgen -G "/usr/include/sys/epoll.h" >/dev/null || need+=(libc6-dev)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
