"""`replicad vm` (Get-VM, Start-VM, Stop-VM)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click

from .common import abs_path, api, global_options, managed, output_format, show

VM_COLUMNS = ("name", "state", "replication_mode", "replication_state", "replication_health")


def vm_path(name: str) -> str:
    return "/v1/vms/" + quote(name, safe="")


def network_options(f):
    f = click.option("--test-failover-network", metavar="FILE",
                     help="The network a test failover brings up (`VM - Test`), as --failover-network.")(f)
    return click.option("--failover-network", metavar="FILE",
                        help="The network the VM gets after a failover: a cloud-init network-config v2 "
                             "document, replicated with the VM; its path on the replica is given to the "
                             "failover hooks as REPLICAD_NETWORK.")(f)


def _networks(failover_network: str | None, test_failover_network: str | None) -> dict:
    """The network files of `vm add`/`vm set` ('' removes one: kept as '')."""
    return {k: (abs_path(v) if v else "") for k, v in
            {"failover_network": failover_network, "test_failover_network": test_failover_network}.items()
            if v is not None}


@click.group("vm")
@global_options
def vm():
    """VMs on this host: named sets of disk images."""


@vm.command("add")
@click.argument("name")
@click.option("--disk", "disks", multiple=True, metavar="PATH",
              help="A disk image (repeatable); with --qemu, a block node name or image path of that process.")
@click.option("--qemu", metavar="QMP_SOCKET",
              help="The VM runs in QEMU: its disks are block nodes of the process behind this QMP socket, "
                   "tracked by QEMU's dirty bitmaps (without --disk: every writable disk).")
@click.option("--nbd-socket", metavar="PATH",
              help="With --qemu: the unix socket QEMU's NBD server exports captures on (default: one in the "
                   "state dir; give the server's own if the process already runs one).")
@click.option("--guest-agent", metavar="SOCKET",
              help="With --qemu: the host side of the guest agent's channel; the guest's filesystems are frozen "
                   "for each capture (application-consistent points, no hooks).")
@click.option("--config-file", metavar="PATH", help="The VM's configuration file (e.g. libvirt XML).")
@network_options
@click.option("--allow-backing", "allow_backing", multiple=True, metavar="DIR",
              help="A folder qcow2 backing files may come from, besides each disk's own (repeatable).")
@managed
def vm_add(name, disks, qemu, nbd_socket, guest_agent, config_file, failover_network, test_failover_network,
           allow_backing):
    """Register a VM on this host.

    A qcow2 disk brings its backing chain: the parents are registered (and replicated)
    with it. A parent must be a regular file under the disk's own folder or a folder
    given with --allow-backing (symlinks are followed, then checked); any other is
    refused. The configuration file and the failover network files, if given, are
    replicated whenever they change.

    \b
    Examples:
      replicad vm add contoso2 --disk /var/lib/libvirt/images/contoso2.img
      replicad vm add web --disk /var/lib/libvirt/images/web.qcow2 --allow-backing /srv/golden-images
      replicad vm add db --qemu /run/db.qmp
    """
    if qemu:
        out = api().call("POST", "/v1/vms", {"name": name, "qemu": abs_path(qemu), "disks": list(disks),
                                             "nbd_socket": abs_path(nbd_socket), "config_file": abs_path(config_file),
                                             "guest_agent": abs_path(guest_agent),
                                             **_networks(failover_network, test_failover_network)})
        show(out, VM_COLUMNS)
        return
    if not disks:
        raise click.UsageError("at least one --disk PATH is required (or --qemu QMP_SOCKET)")
    out = api().call("POST", "/v1/vms", {"name": name, "disks": [abs_path(d) for d in disks],
                                         "config_file": abs_path(config_file),
                                         **_networks(failover_network, test_failover_network),
                                         "allow_backing": [_abs_dir(d) for d in allow_backing]})
    for w in out.pop("warnings", []):
        click.echo(f"warning: {w}", err=True)
    show(out, VM_COLUMNS)


def _abs_dir(d: str) -> str:
    """An --allow-backing folder as given, made absolute (not resolved: the daemon resolves
    it and every backing file the same way)."""
    return str(Path(d).expanduser().absolute())


@vm.command("list")
@managed
def vm_list():
    """List VMs: name, state, mode, replication (-o list adds every field: the disks' paths,
    on a replica server where the copies are)."""
    show(api().call("GET", "/v1/vms"), VM_COLUMNS)


@vm.command("get")
@click.argument("name")
@managed
def vm_get(name):
    """Show one VM: its disks (on a replica, where its copies are), mode, replication state and health."""
    show(api().call("GET", vm_path(name)), VM_COLUMNS)


@vm.command("set")
@click.argument("name")
@click.option("--on-start", metavar="CMD", help="Command `vm start` runs (e.g. virsh start).")
@click.option("--on-stop", metavar="CMD", help="Command `vm stop` runs.")
@click.option("--pre-snapshot", metavar="CMD", help="Freeze command before a capture.")
@click.option("--post-snapshot", metavar="CMD", help="Thaw command after a capture (always runs).")
@click.option("--hook-timeout", type=int, metavar="SECONDS",
              help="How long any hook may run before it is killed (default 300).")
@click.option("--qemu", metavar="QMP_SOCKET",
              help="QEMU now runs the VM's disk files (e.g. a failed-over copy): track them with its dirty "
                   "bitmaps ('' goes back to scanning the files). The next cycle is then a resync.")
@click.option("--nbd-socket", metavar="PATH", help="With --qemu: as for `vm add`.")
@click.option("--guest-agent", metavar="SOCKET", help="A QEMU VM's guest agent socket, as for `vm add` ('' removes).")
@click.option("--on-failover", metavar="CMD",
              help="On the replica: runs after `failover start` made the VM's copy (told the point, kind and "
                   "network in REPLICAD_* variables); if it fails, the VM stays failed over, not started.")
@click.option("--on-test-failover", metavar="CMD",
              help="On the replica: runs after `failover start --as-test` made `VM - Test`, which inherits it "
                   "with --on-start/--on-stop.")
@network_options
@click.option("--add-disk", "add_disks", multiple=True, metavar="PATH",
              help="Replicate this disk image too (repeatable; with its qcow2 backing chain): the next cycle "
                   "sends it whole, the other disks their changes (Set-VMReplication -ReplicatedDisks).")
@click.option("--remove-disk", "remove_disks", multiple=True, metavar="PATH",
              help="Stop replicating this disk (repeatable): the replica drops it at its next point and keeps "
                   "it in the older ones. Not for --qemu VMs.")
@click.option("--allow-backing", "allow_backing", multiple=True, metavar="DIR",
              help="With --add-disk: a folder qcow2 backing files may come from, as for `vm add`.")
@managed
def vm_set(name, on_start, on_stop, pre_snapshot, post_snapshot, hook_timeout, qemu, nbd_socket, guest_agent,
           on_failover, on_test_failover, failover_network, test_failover_network, add_disks, remove_disks,
           allow_backing):
    """Set a VM's host-local hooks ('' removes one), the failover network files that
    are replicated with it (before `replication enable`), and which disks it has.

    \b
    --add-disk/--remove-disk change the disks of a replicating VM in place: the next
    cycle gives a new disk its own initial copy while the others send their deltas, in
    the same sequence of recovery points; a removed disk is dropped on the replica at
    that point and kept in the older ones. Refused for a --qemu VM, on a replica, and
    while an initial copy, a resync or a prepared failover pins the disk set.

    \b
    The snapshot pair runs around each cycle's capture: --pre-snapshot freezes the
    application (e.g. `virsh domfsfreeze`), --post-snapshot thaws it and always runs,
    also when the freeze failed or timed out. A cycle whose freeze succeeded gives an
    `application`-consistent recovery point; otherwise it is `crash` (or `fuzzy`).

    \b
    The failover hooks run on the replica server with REPLICAD_VM, REPLICAD_VM_ID,
    REPLICAD_POINT, REPLICAD_POINT_TIME, REPLICAD_CONSISTENCY, REPLICAD_FAILOVER_KIND
    (planned, unplanned, test) and REPLICAD_NETWORK (the copy of the network file of
    that kind, '' if none) in their environment; their output is logged.

    \b
    Examples:
      replicad vm set contoso2 --pre-snapshot 'virsh domfsfreeze contoso2' \\
                               --post-snapshot 'virsh domfsthaw contoso2' --hook-timeout 30
      replicad vm set contoso2 --failover-network /etc/replicad/contoso2-dr.yaml   # on the primary
      replicad vm set contoso2 --on-failover '/usr/local/sbin/dr-network "$REPLICAD_NETWORK"'  # on the replica
      replicad vm set contoso2 --add-disk /var/lib/libvirt/images/contoso2-data.img
    """
    body = {k: v for k, v in {"on_start": on_start, "on_stop": on_stop, "pre_snapshot": pre_snapshot,
                              "post_snapshot": post_snapshot, "hook_timeout": hook_timeout,
                              "on_failover": on_failover, "on_test_failover": on_test_failover}.items()
            if v is not None}
    body.update(_networks(failover_network, test_failover_network))
    if qemu is not None:
        body["qemu"] = abs_path(qemu) if qemu else ""
        if nbd_socket:
            body["nbd_socket"] = abs_path(nbd_socket)
    if guest_agent is not None:
        body["guest_agent"] = abs_path(guest_agent) if guest_agent else ""
    if add_disks or remove_disks:
        body.update(add_disks=[abs_path(d) for d in add_disks], remove_disks=[abs_path(d) for d in remove_disks],
                    allow_backing=[_abs_dir(d) for d in allow_backing])
    elif allow_backing:
        raise click.UsageError("--allow-backing goes with --add-disk")
    show(api().call("PATCH", vm_path(name), body), VM_COLUMNS)


@vm.command("start")
@click.argument("name")
@managed
def vm_start(name):
    """Run the VM's on-start hook and mark it Running (refused for a replica VM)."""
    show(api().call("POST", vm_path(name) + "/start"), VM_COLUMNS)


@vm.command("stop")
@click.argument("name")
@managed
def vm_stop(name):
    """Run the VM's on-stop hook and mark it Off."""
    show(api().call("POST", vm_path(name) + "/stop"), VM_COLUMNS)


@vm.command("remove")
@click.argument("name")
@managed
def vm_remove(name):
    """Forget a VM. A replica VM's copy is deleted with it; any other VM's files (a
    primary's disks, or a copy whose replication was removed first) stay where they are.
    The output says which."""
    doc = api().call("DELETE", vm_path(name))
    if output_format() == "table":
        click.echo(doc.get("message") or f"{doc['removed']} removed")
    else:
        show(doc)
