# agentd %post ($1: 1 on install, 2 on upgrade). Nothing is enabled or
# started unasked, as for the .deb. When systemd runs, its view of the
# units is reloaded; on an upgrade the units that were running are
# restarted (try-restart; KillMode=process: systemd signals only the
# daemons, never their sandboxes). %systemd_postun_with_restart does this
# from the old package's %postun; here the new package's %post does it, so
# that an upgrade from this very version on gets it too (no spec file, no
# macros: the steps are written out).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 2 ]; then
        systemctl try-restart agentd.service agentd-server.service agentd-node.service >/dev/null 2>&1 || :
    fi
fi
