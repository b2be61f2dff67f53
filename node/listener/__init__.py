"""The DICOM listener: a pynetdicom C-STORE/C-ECHO SCP that stores and indexes, nothing more.

Entry point: :func:`node.listener.server.start_listener`. Submodules: ``ae`` (AE and
association acceptance), ``handlers`` (C-STORE/C-ECHO), ``parsing`` (structural check and
index fields), ``status`` (DIMSE status table), ``server`` (start/stop).
"""
