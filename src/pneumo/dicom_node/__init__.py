"""pneumo as a DICOM node: a storage SCP that reads each chest film as it arrives and sends the
result back to the PACS as DICOM (an SR and a secondary capture), or the same over DICOMweb.

``spool`` (accepted instances on disk before success is answered), ``scp`` (the listener),
``reading`` (one spooled film read: finding, scope, Grad-CAM), ``results`` (the SR and the
secondary capture), ``send`` (C-STORE SCU), ``node`` (the worker that ties them), ``poll``
(DICOMweb). pynetdicom, highdicom and dicomweb-client are the extra ``pneumo[dicom-node]``.
"""
