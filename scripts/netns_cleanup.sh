# Sourced by the emulated-host bench scripts: `netns_cleanup PREFIX` removes the namespaces
# PREFIXn* (killing what runs in them), the bridge PREFIXbr and the links PREFIXv*, as the
# testkit's netns::cleanup does; the scripts run it on exit, so a bench stopped midway
# (Ctrl-C, a kill) leaves no namespace or link behind.
netns_cleanup() {
  local prefix=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk -v p="^${prefix}n" '$1 ~ p {print $1}'); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "${prefix}br" 2>/dev/null || true
  # Host ends of the hosts' veth pairs a killed run can leave behind (the next run's
  # `ip link add` would fail with "File exists").
  local link
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${prefix}v"); do
    ip link del "$link" 2>/dev/null || true
  done
}
