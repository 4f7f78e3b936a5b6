# agentd %postun ($1: 0 on erase, 1 on upgrade). systemd forgets the removed
# units. RPM has no purge: /var/lib/agentd (the store, event logs, bundle
# cache) stays after an erase, as RPM packages leave their data, and a
# modified /etc/agentd/agentd.toml stays as agentd.toml.rpmsave. Remove them
# by hand for a clean slate.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
