"""``pynsbook images``: import, list, inspect and remove images."""
from __future__ import annotations

import argparse
from typing import Any

_EPILOG = """examples:
  pynsbook images busybox                      # an image from Debian's busybox-static
  pynsbook images import ./rootfs myroot       # a directory as a one-layer image
  pynsbook images import ./extra app --base myroot   # a directory as a layer on top
  pynsbook images import image.tar app         # an OCI layout or a `docker save` tarball
  pynsbook images ls
  pynsbook images layers app
  pynsbook images rm app
  pynsbook run --image busybox -- sh -c 'cat /etc/passwd'

a Debian image (as root, with debootstrap installed):
  debootstrap --variant=minbase bookworm /var/tmp/bookworm http://deb.debian.org/debian
  pynsbook images import /var/tmp/bookworm debian

the store: $PYNSBOOK_STORE, else $XDG_DATA_HOME/pynsbook, else ~/.local/share/pynsbook"""


def add_parser(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("images", help="image layers: import, ls, layers, rm",
                              description="Images are stacks of read-only layers, stored once "
                              "however many images share them; containers run on them with "
                              "--image NAME.", epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="images_cmd", metavar="ACTION")
    sub.required = True
    imp = sub.add_parser("import", help="import a directory, an OCI layout or a docker save tarball")
    imp.add_argument("path", metavar="PATH")
    imp.add_argument("name", metavar="NAME")
    imp.add_argument("--base", metavar="IMAGE", help="put a directory's layer on top of IMAGE")
    bb = sub.add_parser("busybox", help="make a minimal image from Debian's busybox-static")
    bb.add_argument("name", metavar="NAME", nargs="?", default="busybox")
    sub.add_parser("ls", help="list the images")
    lay = sub.add_parser("layers", help="an image's layers, top first")
    lay.add_argument("name", metavar="NAME")
    rm = sub.add_parser("rm", help="remove an image (and the layers no other image uses)")
    rm.add_argument("name", metavar="NAME")
    sub.add_parser("du", help="disk used by the store")


def main(args: Any) -> int:
    from .. import images
    from ..spec import format_size
    cmd = args.images_cmd
    if cmd == "import":
        image = images.import_path(args.path, args.name, base=args.base)
        print(f"{image.name}: {len(image.layers)} layer(s), top {image.layers[-1][:19]}")
    elif cmd == "busybox":
        image = images.import_busybox(args.name)
        print(f"{image.name}: {len(image.layers)} layer(s), top {image.layers[-1][:19]}")
    elif cmd == "ls":
        print(images.table())
    elif cmd == "layers":
        print(images.layers_table(args.name))
    elif cmd == "rm":
        gone = images.remove(args.name)
        print(f"removed {args.name}" + (f" and {len(gone)} layer(s) no other image used"
                                        if gone else " (its layers are shared, so they stay)"))
    elif cmd == "du":
        print(f"{format_size(images.disk_usage())}\t{images.Store().root}")
    return 0
