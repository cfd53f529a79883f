"""HL7 v2 for the RIS: final reports in (ORU^R01 over MLLP), AI drafts out (ORU^R01, P).

``message``   reading an ORU^R01 into reports, ACKs, escaping (pure)
``oru``       the AI draft as an ORU^R01 (pure)
``mllp``      MLLP framing with a size limit, on python-hl7's asyncio streams
``receive``   one incoming message: store durably, record, choose the ACK
``listener``  the MLLP server (in the monitor thread of ``cxrnode serve``)
``sender``    the outbox's MLLP transport and how it reads ACKs
"""
