"""Web Push: offline notifications through the browsers' push services.

VAPID keys (:mod:`~pushsvc.push.keys`, RFC 8292), which endpoints may be
fetched (:mod:`~pushsvc.push.endpoints`, the SSRF guard), one encrypted
request (:mod:`~pushsvc.push.sender`, RFC 8291 ``aes128gcm`` and RFC 8030
headers, on Tornado's asynchronous HTTP client), and :class:`PushService`
(:mod:`~pushsvc.push.service`): subscriptions, when to push, a bounded queue
and bounded concurrency, retries. docs/webpush.md tells the whole story.
"""
