"""What the operator's side and the device both run, above the wire contract.

``edgeota.protocol`` holds the formats (and depends only on ``cryptography``);
this package holds the code both ends execute, so the server never imports the
device package to run it:

* :mod:`~edgeota.runtime.validation`: the validation gate (devices before a hot
  swap, the server before it accepts a release, ``release publish`` before it
  signs);
* :mod:`~edgeota.runtime.model_signature`: a model's I/O signature as
  onnxruntime sees it (the gate compares it with the manifest, the manifest
  builder writes it into one);
* :mod:`~edgeota.runtime.http_fetcher`: the ``tuf.ngclient`` fetcher over HTTP(S)
  (devices' update cycles, and the publisher's verified view of the image
  repository);
* :mod:`~edgeota.runtime.agent_config`: ``agent.toml``, written by enrolment and
  read by the agent.

It needs only the agent extra (onnxruntime, numpy, tuf, urllib3) and the base
install (tomli-w). ``onnx`` is a server-side dependency: the one function that
needs it imports it when called, never at import time.
"""
