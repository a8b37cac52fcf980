"""h11's line grammars without their quadratic backtracking (h11 0.16), installed into h11, and the
framing rule h11 leaves to its callers (``both_framings``).

Two of h11's patterns let two repeats compete for the same bytes, so a crafted line takes time in
N², with no checkpoint, in whichever process parses it:
- a header line (and a chunked body's trailer line), ``name ":" OWS [value] OWS``: with an empty
  value both OWS take the same spaces, so ``a:``, N spaces and a byte h11 refuses froze the proxy,
  the hub (hypercorn reads HTTP/1.1 with h11 too) and the simulator for 11 s with one 64 KB head,
  sent before any key is checked;
- a chunk-size line, ``size [";" ext] OWS CRLF``: ``1;``, N spaces and a stray LF froze them for
  3 s from a request body, and a worker from an engine's answer.
The patterns here accept and refuse the same lines, with the same groups, in linear time (Python
≥ 3.11: possessive repeats). Importing this module puts them in h11's place, once per process;
every module that parses HTTP/1.1 (ours, hypercorn's, httpx's) imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import h11._readers

HEADER_FIELD = re.compile(
    rb"(?P<field_name>[-!#$%&'*+.^_`|~0-9a-zA-Z]+)"  # h11._abnf: token ":" OWS field-value OWS
    rb":[ \t]*+"
    rb"(?P<field_value>(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*+)?)"
    rb"[ \t]*")
# h11._abnf: chunk-size [";" anything but LF] OWS CRLF, a whole line; the extension (h11 ignores it)
# takes all up to the line's CRLF, as h11's greedy ".*" does
CHUNK_HEADER = re.compile(rb"(?P<chunk_size>([0-9A-Fa-f]){1,20})(?P<chunk_ext>;[^\n]*(?=\r\n\Z))?[ \t]*\r\n")
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*+)?[ \t]*+")  # the same, without its CRLF

h11._readers.header_field_re = HEADER_FIELD
h11._readers.chunk_header_re = CHUNK_HEADER


BOTH_FRAMINGS = "a request with both Content-Length and Transfer-Encoding"


def both_framings(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request names its body's length twice. h11 frames such a body by Transfer-Encoding
    and keeps the connection; RFC 9112 §6.1 wants it closed, since a server in front that read the
    length instead would see another request in the same bytes (request smuggling): the proxy and
    the hub answer 400 and close."""
    length = chunked = False
    for key, _ in headers:
        length |= key == b"content-length"
        chunked |= key == b"transfer-encoding"
    return length and chunked
