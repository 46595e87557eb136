"""The world as text (`drekifs world`, .dreki/world) and as JSON (`--json`)."""

from __future__ import annotations

import json

from .model import World


def render_tree(world: World, limit: int = 200_000) -> str:
    """The tree, one directory a line, with friendly names and node addresses."""
    lines = []
    root_name = world.root.friendly if world.domain in world.regions else None
    lines.append(world.domain + (f'  "{root_name}"' if root_name else ""))

    # Depth-first with the box-drawing prefix of each level.
    stack: list[tuple[str, str, str, bool]] = [
        (dirname, member, "", i == len(world.children(world.domain)) - 1)
        for i, (dirname, member) in enumerate(world.children(world.domain))
    ][::-1]
    count = 0
    while stack:
        dirname, member, prefix, last = stack.pop()
        count += 1
        if count > limit:
            lines.append(f"... (more than {limit} paths; the rest is not shown)")
            break
        branch = "└── " if last else "├── "
        node = world.nodes.get(member)
        friendly = world.friendly(member)
        label = f'  "{friendly}"' if friendly else ""
        if node is not None:
            addr = str(node.address) if node.address else "no address"
            lines.append(f"{prefix}{branch}{dirname}{label}  {addr}  [{member}]")
            continue
        lines.append(f"{prefix}{branch}{dirname}/{label}")
        kids = world.children(member)
        inner = prefix + ("    " if last else "│   ")
        for i, (child_dir, child) in reversed(list(enumerate(kids))):
            stack.append((child_dir, child, inner, i == len(kids) - 1))
    return "\n".join(lines) + "\n"


def render_errors(world: World) -> str:
    """One line per world error, or nothing."""
    return "".join(f"{e}\n" for e in world.errors)


def render_json(world: World) -> str:
    data = world.to_json()
    data["paths"] = [
        {"path": "/".join(loc.segments), "name": loc.name, "node": loc.is_node}
        for loc in world.locations(limit=200_000)
    ]
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
