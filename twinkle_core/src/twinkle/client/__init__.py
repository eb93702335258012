"""The http-mode client: components built with ``twinkle.initialize(mode='http', ...)`` become
proxies to objects hosted by ``twinkle serve``.

* :mod:`~twinkle.client.codec`: how arguments and results cross the wire.
* :mod:`~twinkle.client.session`: the HTTP session (base URL, API key, errors).
* :mod:`~twinkle.client.proxy`: :class:`RemoteComponent`, built from a component's
  :func:`twinkle.dispatch.remote` method metadata.
"""
