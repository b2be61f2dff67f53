"""The C-STORE-RSP of a successful store, encoded directly (PS3.7 §9.3.1.2, §6.3.1).

pynetdicom builds every DIMSE message as a pydicom ``Dataset`` and encodes it twice
(once to compute the Command Group Length, once to send it). For the listener's most
frequent message, a C-STORE response with status Success, that was ~0.25 ms of CPU
under the GIL per instance (py-spy): a fifth of what the serving process spends per
stored instance with four parallel associations.

:class:`FastStoreResponses` is pynetdicom's DIMSE provider with one shortcut: a C-STORE
response whose status is 0x0000 and which carries no Error Comment or Offending Element
is encoded here, as the same bytes pynetdicom would send (tests/node/test_transport.py
compares them), and handed to the DUL as one P-DATA primitive (PS3.8 §9.3.5: one PDV,
message control header 0x03 = command, last fragment). Everything else, failure and
warning responses included, and any association with an ``EVT_DIMSE_SENT`` handler
bound, goes through pynetdicom unchanged.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

from node.listener.status import StoreStatus

LOGGER = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001
#: Error: Cannot understand, a required UID is invalid (StoreStatus.INVALID_UID).
_INVALID_UID = int(StoreStatus.INVALID_UID)

_C_STORE_RSP = 0x8001  # Command Field (PS3.7 Table 9.3-2)
_NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 §E.1)
_COMMAND_LAST_FRAGMENT = b"\x03"  # PS3.8 §E.2 message control header


def _element(tag: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian (PS3.5 §7.1.3): tag, 32-bit length."""
    return struct.pack("<HHL", 0x0000, tag, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw  # UI padded with NUL to even length


def encode_store_success(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RSP with status Success, elements in tag order."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class_uid)),  # Affected SOP Class UID
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),  # Command Field
            _element(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
            _element(0x0800, struct.pack("<H", _NO_DATA_SET)),  # Command Data Set Type
            _element(0x0900, struct.pack("<H", 0x0000)),  # Status: Success
            _element(0x1000, _uid(sop_instance_uid)),  # Affected SOP Instance UID
        )
    )
    return _element(0x0000, struct.pack("<L", len(body))) + body  # Command Group Length


def _plain_store_success(primitive: Any) -> bytes | None:
    """The encoded command set if ``primitive`` is a plain successful C-STORE response."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status != 0x0000 or primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None:
        return None
    return encode_store_success(
        str(primitive.AffectedSOPClassUID),
        str(primitive.AffectedSOPInstanceUID),
        int(primitive.MessageIDBeingRespondedTo),
    )


def _valid_length_uid(value: object) -> str | None:
    text = str(value or "").strip()
    return text if 0 < len(text) <= 64 else None


class ListenerDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that answers a C-STORE-RQ whose command set it cannot
    turn into a primitive (a UID over 64 characters, PS3.5 §9.1) with 0xC213.

    pynetdicom 3.0.4 validates the command's UIDs while converting the received message
    (``message_to_primitive``) and, on failure, raises Evt19 (invalid PDU): the
    association is aborted and the sender never learns which instance was wrong. Here
    the message is complete (command and data set received), so a C-STORE-RSP can be
    answered instead (PS3.7 §9.3.1.2: Message ID Being Responded To and Status; the
    Affected SOP UIDs are sent only when they are valid) and the association goes on.
    Other commands keep pynetdicom's behaviour. ``receive_primitive`` is pynetdicom's
    own, with that one branch added (it runs on the DUL thread).

    It also runs a callback once the response to a given request has been queued
    (:meth:`after_response`): pynetdicom marks the reactor "paused" while a handler runs,
    so a thread that sends a new request from a handler (the Storage Commitment report,
    node.listener.commitment) could otherwise overtake the handler's own response.
    """

    _after: dict[int, Callable[[], None]] | None = None

    def after_response(self, message_id: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` right after the response to request ``message_id`` is queued."""
        if self._after is None:
            self._after = {}
        self._after[message_id] = callback

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send as pynetdicom does, then run the hook queued for this message id (post-response work)."""
        super().send_msg(primitive, context_id)
        responded = primitive.MessageIDBeingRespondedTo
        if self._after and responded is not None:
            callback = self._after.pop(int(responded), None)
            if callback is not None:
                callback()

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's receive, answering an unconvertible C-STORE-RQ with 0xC213 instead of aborting."""
        if self.message is None:
            self.message = DIMSEMessage()
        message = self.message
        if not message.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = int(message.context_id)  # type: ignore[arg-type]
        try:
            d_primitive = message.message_to_primitive()
        except Exception as exc:
            if not (isinstance(exc, ValueError) and self._answer_invalid_store(message, context_id, exc)):
                LOGGER.error("Received an invalid DIMSE message")
                LOGGER.exception(exc)
                self.dul.event_queue.put("Evt19")
                return
        else:
            if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
                self.cancel_req[int(d_primitive.MessageIDBeingRespondedTo)] = d_primitive  # type: ignore[arg-type]
            elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
                threading.Thread(
                    target=make_target(self.assoc._serve_request), args=(d_primitive, context_id)
                ).start()
            else:
                # pynetdicom's queue annotation omits C-CANCEL, which this branch (as upstream's) can pass on
                self.msg_queue.put((context_id, d_primitive))  # type: ignore[arg-type]  # see above
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        self.message = None

    def _answer_invalid_store(self, message: DIMSEMessage, context_id: int, exc: Exception) -> bool:
        """Send 0xC213 for an unconvertible C-STORE-RQ; False = not one (abort as before)."""
        command = message.command_set
        if int(command.get("CommandField", 0) or 0) != _C_STORE_RQ or "MessageID" not in command:
            return False
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = int(command.MessageID)
        rsp.Status = _INVALID_UID
        # pynetdicom's C_STORE.__init__ sets ErrorComment = None, so mypy infers None; it is a string field
        rsp.ErrorComment = "a UID in the command set is not a valid UID (more than 64 characters?)"  # type: ignore[assignment]  # see above
        sop_class = _valid_length_uid(command.get("AffectedSOPClassUID"))
        sop_instance = _valid_length_uid(command.get("AffectedSOPInstanceUID"))
        if sop_class and sop_instance:
            try:
                rsp.AffectedSOPClassUID = UID(sop_class)
                rsp.AffectedSOPInstanceUID = UID(sop_instance)
            except ValueError:
                pass
        LOGGER.warning(
            "C-STORE refused 0x%04X invalid_uid: the command set could not be read (%s; calling=%s)",
            _INVALID_UID, exc, str(self.assoc.requestor.ae_title).strip(),
        )
        self.send_msg(rsp, context_id)
        return True


class FastStoreResponses(ListenerDimse):
    """pynetdicom's DIMSE provider, sending plain C-STORE successes without pydicom."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a plain C-STORE success from a prebuilt template; anything else goes through pynetdicom."""
        command = _plain_store_success(primitive)
        max_pdu = self.maximum_pdu_size
        if (
            command is None
            or (max_pdu and len(command) + 6 > max_pdu)  # must fit one PDV (4-byte length, id, header)
            or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)  # someone wants pynetdicom's message object
        ):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _COMMAND_LAST_FRAGMENT + command))
        self.dul.send_pdu(pdata)
