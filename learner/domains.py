"""Domains: which adapter a message is served by, from its `source`.

A configurable table maps sources to domain names; a source it does not name (or a message without one) belongs
to the default domain. Each (task, domain) may have its own champion; a domain without one is served the default
domain's, so promoting a version for one domain cannot change what any other domain is served.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from storage.schema import DEFAULT_DOMAIN

__all__ = ["DEFAULT_DOMAIN", "DOMAIN_PATTERN", "DomainTable", "check_domain"]

# Domain names become file names (CHAMPION.<domain>) and metric label values: short, lower case, no separators.
DOMAIN_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_DOMAIN: Final = re.compile(DOMAIN_PATTERN)


def check_domain(name: str) -> str:
    """Return `name` if it is a valid domain name, else raise ValueError saying what one looks like."""
    if not _DOMAIN.match(name):
        raise ValueError(
            f"{name[:40]!r} is not a domain name: 1-32 characters of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit"
        )
    return name


class DomainTable:
    """Sources to domains, matched without regard to case; anything else is the default domain."""

    def __init__(self, sources: Mapping[str, str] | None = None) -> None:
        self._by_source = {source.casefold(): check_domain(domain) for source, domain in (sources or {}).items()}

    def domain_of(self, source: str | None) -> str:
        """Return the domain of a message from this source."""
        if not source:
            return DEFAULT_DOMAIN
        return self._by_source.get(source.casefold(), DEFAULT_DOMAIN)

    @property
    def domains(self) -> list[str]:
        """Return every domain the table names, the default first."""
        return [DEFAULT_DOMAIN, *sorted(set(self._by_source.values()) - {DEFAULT_DOMAIN})]
