#!/usr/bin/env bash
# The Prometheus alert rules shipped in deploy/prometheus: `promtool check rules` (syntax, PromQL,
# templates) and `promtool test rules` (each alert fires and stays silent where its unit tests
# say). Installs promtool from Debian's `prometheus` package when it is missing (only the
# package: nothing is started; its postinst only creates the prometheus user).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null; then
  echo "walvault: installing promtool (Debian's prometheus package)" >&2
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check rules deploy/prometheus/walvault-alerts.yml
promtool test rules deploy/prometheus/walvault-alerts.test.yml deploy/prometheus/walvault-alerts.schedule.test.yml
