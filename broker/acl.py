"""The Mosquitto ACL of one fedhive project: who may publish and receive what.

Mosquitto's ACL is an allow list checked on every publish and on every message it delivers: a
publish nobody is granted is refused (MQTT 5: PUBACK reason 0x87) and a message a subscriber may
not read is silently not delivered. :func:`render_acl` writes it from the roles of DESIGN.md:

- agents log in with their agent name, so ``pattern`` lines with ``%u`` (Mosquitto puts the user
  name in) say what every agent may do with *its own* topics; Mosquitto substitutes ``%u`` only
  as a whole topic level, which is exactly how an agent name appears in fedhive's topics;
- the admin and each aggregator get a ``user`` block of their own.

``pattern`` lines apply to every authenticated user, admin and aggregators included: what they
grant (an agent's own topics, reading models and status) is no more than those roles hold, and
user names are unique across roles (an agent cannot be named like an aggregator), so no one gains
another member's rights through them. They also apply to every project on the broker, which is
why one password file and ACL serve one project (see docs/SECURITY.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from common.topics import CHUNK_SUFFIX, PREFIX, check_name

__all__ = ["agent_rules", "render_acl"]

_HEADER: Final = """\
# fedhive ACL for project {project} -- written by `fedhive broker init`; regenerate it with
# fedhive rather than editing it (see docs/SECURITY.md for what each rule is for).
#
# An allow list: a publish not granted below is refused (MQTT 5: PUBACK 0x87), a message a client
# may not read is not delivered to it. Nothing is granted before the first `user` line, so
# anonymous clients (refused anyway: allow_anonymous false) could do nothing.
#
# Agents log in with their agent name: the `pattern` lines are their rules, %u being the user
# name. Patterns apply to every user; those without %u grant every member of the project the
# models and status, and make mosquitto warn "does not contain '%c' or '%u'" at start: expected.
"""


def agent_rules(project: str) -> list[tuple[str, str]]:
    """``(access, topic)`` rules of an agent, with ``%u`` standing for its name.

    An agent writes its own status, heartbeat, requests and local models (to any aggregator: the
    assignment decides which one reads them); it reads models, status, its own inbox and
    assignment, and the base model.
    """
    root = _root(project)
    return [
        ("write", f"{root}/agents/%u/status"),
        ("write", f"{root}/agents/%u/heartbeat"),
        ("write", f"{root}/agents/%u/request"),
        ("write", f"{root}/agg/+/local/%u"),
        ("write", f"{root}/agg/+/local/%u/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agents/%u/inbox"),
        ("read", f"{root}/agents/%u/inbox/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agents/%u/assign"),
        ("read", f"{root}/agg/+/model"),
        ("read", f"{root}/agg/+/model/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agg/+/status"),
        ("read", f"{root}/sg/model"),
        ("read", f"{root}/sg/model/{CHUNK_SUFFIX}"),
        ("read", f"{root}/sg/status"),
        ("read", f"{root}/base"),
        ("read", f"{root}/base/{CHUNK_SUFFIX}"),
    ]


def admin_rules(project: str) -> list[tuple[str, str]]:
    """The admin reads the whole project and alone writes the base model and control topics."""
    root = _root(project)
    return [
        ("read", f"{root}/#"),
        ("write", f"{root}/base"),
        ("write", f"{root}/base/{CHUNK_SUFFIX}"),
        ("write", f"{root}/agg/+/control"),
    ]


def aggregator_rules(project: str, name: str) -> list[tuple[str, str]]:
    """An aggregator publishes its own model, status, regional result, replies and metrics,
    writes to every agent's inbox and assignment and asks the sg-aggregator for its model; it
    reads agents' status, heartbeats and requests, the local models sent to it, its control
    topic and inbox, the base model, aggregators' status and the SG topics.
    """
    root = _root(project)
    agg = f"{root}/agg/{check_name('aggregator', name)}"
    return [
        ("write", f"{agg}/model"),
        ("write", f"{agg}/model/{CHUNK_SUFFIX}"),
        ("write", f"{agg}/status"),
        ("write", f"{agg}/agents"),
        ("write", f"{agg}/regional"),
        ("write", f"{agg}/regional/{CHUNK_SUFFIX}"),
        # `control` itself stays the admin's: only the replies under it are the aggregator's.
        ("write", f"{agg}/control/reply/#"),
        ("write", f"{root}/agents/+/inbox"),
        ("write", f"{root}/agents/+/inbox/{CHUNK_SUFFIX}"),
        ("write", f"{root}/agents/+/assign"),
        ("write", f"{root}/metrics/{name}"),
        # Asking the sg-aggregator for (chunks of) the SG model.
        ("write", f"{root}/sg/request"),
        ("read", f"{root}/base"),
        ("read", f"{root}/base/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agents/+/status"),
        ("read", f"{root}/agents/+/heartbeat"),
        ("read", f"{root}/agents/+/request"),
        ("read", f"{agg}/local/#"),
        ("read", f"{agg}/control"),
        # From the sg-aggregator: acks for regional results, chunk re-requests, the SG model.
        ("read", f"{agg}/inbox"),
        ("read", f"{agg}/inbox/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agg/+/status"),
        ("read", f"{root}/sg/#"),
    ]


def sg_aggregator_rules(project: str) -> list[tuple[str, str]]:
    """The semi-global aggregator publishes the SG topics and writes to aggregators' inboxes; it
    reads regional results, aggregator status, the SG topics (its own retained model, requests)
    and the base model."""
    root = _root(project)
    return [
        ("write", f"{root}/sg/#"),
        ("write", f"{root}/agg/+/inbox"),
        ("write", f"{root}/agg/+/inbox/{CHUNK_SUFFIX}"),
        ("read", f"{root}/sg/#"),
        ("read", f"{root}/agg/+/regional"),
        ("read", f"{root}/agg/+/regional/{CHUNK_SUFFIX}"),
        ("read", f"{root}/agg/+/status"),
        ("read", f"{root}/base"),
        ("read", f"{root}/base/{CHUNK_SUFFIX}"),
    ]


def render_acl(
    project: str,
    *,
    admins: Iterable[str],
    aggregators: Iterable[str],
    sg_aggregators: Iterable[str] = (),
) -> str:
    """Render the ACL file of ``project``.

    Agents need no line of their own (the patterns cover any agent the password file admits), so
    enrolling an agent changes the password file only.

    Args:
        project: the project whose topics the rules cover.
        admins: admin user names.
        aggregators: aggregator names (= their user names).
        sg_aggregators: semi-global aggregator names (= their user names).

    Returns:
        The ACL text for Mosquitto's ``acl_file``.

    Raises:
        MessageError: a name that cannot be a topic level (or a user name).
    """
    lines = [_HEADER.format(project=check_name("project", project))]
    lines.append("# -- agents (every user; %u = the user name = the agent name)")
    lines += [f"pattern {access} {topic}" for access, topic in agent_rules(project)]
    blocks = [
        *(("admin", name, admin_rules(project)) for name in admins),
        *(("aggregator", name, aggregator_rules(project, name)) for name in aggregators),
        *(("sg-aggregator", name, sg_aggregator_rules(project)) for name in sg_aggregators),
    ]
    for role, name, rules in blocks:
        lines.append("")
        lines.append(f"# -- {role} {name}")
        lines.append(f"user {check_name(role, name)}")
        lines += [f"topic {access} {topic}" for access, topic in rules]
    return "\n".join(lines) + "\n"


def _root(project: str) -> str:
    return f"{PREFIX}/{check_name('project', project)}"
