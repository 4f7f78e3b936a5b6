# agentd %preun ($1: 0 on erase, 1 on upgrade). On erase the units are
# disabled and stopped (each daemon stops its sandboxes on the way out), as
# %systemd_preun does; on an upgrade they keep running until %post
# restarts them.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now agentd.service agentd-server.service agentd-node.service >/dev/null 2>&1 || :
fi
