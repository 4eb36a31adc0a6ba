// Example service worker for pushsvc's Web Push (docs/webpush.md): shows each push as a
// system notification and focuses (or opens) the app when it is clicked. Serve your own
// copy from your app's origin; pushsvc serves this one at /client/sw.js.
//
// The payload is JSON: {id, type, title, message, data, truncated?}. The same message also
// reaches the page through the WebSocket inbox when it connects: drop it there by `id`
// (PushClient does), and here the `tag` keeps one system notification per message id.

self.addEventListener("push", (event) => {
  let push = {};
  try {
    push = event.data ? event.data.json() : {};
  } catch {
    push = { message: event.data ? event.data.text() : "" };
  }
  const title = push.title || "New notification";
  const options = {
    body: push.message || push.text || "",
    tag: push.id || undefined,
    data: push,
  };
  event.waitUntil(self.registration.showNotification(title, options));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const push = event.notification.data || {};
  const target = (push.data && typeof push.data.url === "string" && push.data.url) || "/";
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      for (const client of windows) {
        if ("focus" in client) return client.focus();
      }
      return self.clients.openWindow(target);
    })(),
  );
});
