"""Presentation context negotiation as a storage SCP should do it: for each proposed context, the
first transfer syntax the requestor listed that the node supports.

pynetdicom's acceptor picks, for every context of a SOP class, the first of *its own* syntaxes
that the requestor listed, from one list per SOP class. A sender that proposes one context per
encoding of its files (DCMTK's dcmsend and storescu with several inputs: [JPEG Lossless, Explicit
VR LE], [RLE, Explicit VR LE], ...) then gets Explicit VR Little Endian on each and converts, or
cannot send at all (an RLE file when no accepted context is RLE). A scanner lists its native
(as-stored) syntax first; accepting it, context by context, stores every instance exactly as the
scanner has it.

pynetdicom offers no hook between its negotiation and the A-ASSOCIATE-AC, so the node wraps its
acceptor negotiation (``pynetdicom.acse.negotiate_as_acceptor``) once: the same result (which
contexts are accepted, roles, rejection reasons), with each accepted context's transfer syntax
chosen by the requestor's order among those the node supports for that SOP class.
"""

from __future__ import annotations

import threading

_installed = threading.Lock()
_done = False


def _preferring_requestor(original):
    def negotiate(rq_contexts, ac_contexts, roles=None):
        result, reply_roles = original(rq_contexts, ac_contexts, roles)
        supported = {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in ac_contexts or []}
        proposed = {cx.context_id: cx for cx in rq_contexts or []}
        for cx in result:
            rq = proposed.get(cx.context_id)
            if cx.result != 0x00 or rq is None:
                continue
            ours = supported.get(str(cx.abstract_syntax), set())
            first = next((ts for ts in rq.transfer_syntax if str(ts) in ours), None)
            if first is not None and first != cx.transfer_syntax[0]:
                cx.transfer_syntax = [first]
        return result, reply_roles

    negotiate.__wrapped__ = original
    return negotiate


def prefer_requestor_syntaxes() -> None:
    """Install the per-context choice in this process's pynetdicom (idempotent)."""
    global _done
    from pynetdicom import acse

    with _installed:
        if not _done:
            acse.negotiate_as_acceptor = _preferring_requestor(acse.negotiate_as_acceptor)
            _done = True
