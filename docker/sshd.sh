#!/usr/bin/env bash
# An ssh server run by the image's (non-root) user, for multi-node horovodrun: horovodrun on one
# host starts the ranks of the other hosts over ssh, inside the container where this runs.
#
#   docker/sshd.sh [PORT]     (default 12345; run with --network host, see docker/README.md)
#
# Keys come from $SSH_KEYS_DIR (default /ssh-keys, mounted read-only): a key pair `id_ed25519`
# (or id_rsa) shared by all hosts, and `authorized_keys` holding its public half. They are
# copied into ~/.ssh with the permissions ssh insists on. The host key is made on first start.
set -euo pipefail

port=${1:-12345}
keys=${SSH_KEYS_DIR:-/ssh-keys}
state="$HOME/.sshd"
mkdir -p "$HOME/.ssh" "$state"
chmod 700 "$HOME/.ssh" "$state"

if [[ -d "$keys" ]]; then
  for f in "$keys"/id_* "$keys"/authorized_keys "$keys"/config; do
    if [[ -f "$f" ]]; then install -m 600 "$f" "$HOME/.ssh/"; fi
  done
fi
if [[ ! -s "$HOME/.ssh/authorized_keys" ]]; then
  echo "sshd.sh: no authorized_keys in $keys or ~/.ssh; mount the shared keys at $keys" >&2
  exit 1
fi
if [[ ! -f "$state/ssh_host_ed25519_key" ]]; then
  ssh-keygen -q -t ed25519 -N '' -f "$state/ssh_host_ed25519_key"
fi

# Not root, so no privilege separation user and no PAM: only this user can log in, with a key.
cat >"$state/sshd_config" <<EOF
Port $port
HostKey $state/ssh_host_ed25519_key
PidFile $state/sshd.pid
AuthorizedKeysFile $HOME/.ssh/authorized_keys
AllowUsers $(id -un)
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
EOF
echo "sshd.sh: listening on port $port as $(id -un)" >&2
exec /usr/sbin/sshd -D -e -f "$state/sshd_config"
