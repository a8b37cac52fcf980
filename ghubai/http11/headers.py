"""h11's header-line grammar without its quadratic backtracking (h11 0.16), installed into h11.

h11 matches a header line (and a chunked body's trailer line) with ``name ":" OWS [value] OWS``.
When the value is empty the two runs of optional whitespace compete for the same spaces, so a line
of ``a:``, N spaces and a byte h11 refuses takes time in N², with no checkpoint: a 64 KB request
head, sent by anyone before any key is checked, froze the proxy, the hub (hypercorn reads HTTP/1.1
with h11 too) and the simulator for 11 s; an engine's or a hub's answer head did the same to a
worker or a proxy. ``HEADER_FIELD`` is the same grammar with possessive repeats (Python ≥ 3.11):
it accepts and refuses the same lines, with the same groups, in linear time. Importing this module
puts it in h11's place, once per process; every module that reads HTTP/1.1 imports it.
"""

from __future__ import annotations

import re

import h11._readers

HEADER_FIELD = re.compile(
    rb"(?P<field_name>[-!#$%&'*+.^_`|~0-9a-zA-Z]+)"  # h11._abnf: token ":" OWS field-value OWS
    rb":[ \t]*+"
    rb"(?P<field_value>(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*+)?)"
    rb"[ \t]*")

h11._readers.header_field_re = HEADER_FIELD
