"""pushsvc's built-in message types, installed as ``pushsvc_plugins``.

Each module is a plugin registered through the ``pushsvc`` entry-point
group in ``setup.cfg``, exactly as a third-party plugin would be; core
never imports them. Disable one with ``plugins.disabled = ["chat"]``.
"""
