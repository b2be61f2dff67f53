"""Export of reports back to the PACS: C-STORE SCU (``scu``) and the retrying outbox (``outbox``)."""
