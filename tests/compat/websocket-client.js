// TUTORIAL CODE, kept as the classic WebSocket tutorial writes it: the WebSocketClient class
// with connect/on/emit/send/reconnect (fixed 3 s reconnect delay, gives up after 5 attempts,
// one handler per message type, no acks, no dedup, rooms forgotten on reconnect).
// Written for a plain Node `ws` server on ws://localhost:8080; clients/js/test/compat.test.js
// runs it against pushsvc unchanged except for that URL (pushsvc's /ws with ?access_token=JWT).
// Do not "fix" it: it stands for code in the wild.

class WebSocketClient {
  constructor(url) {
    this.url = url;
    this.ws = null;
    this.reconnectAttempts = 0;
    this.maxReconnectAttempts = 5;
    this.reconnectInterval = 3000;
    this.messageHandlers = new Map();
  }

  connect() {
    this.ws = new WebSocket(this.url);

    this.ws.onopen = () => {
      console.log('Connected to server');
      this.reconnectAttempts = 0;
    };

    this.ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      const handler = this.messageHandlers.get(message.type);
      if (handler) {
        handler(message);
      }
    };

    this.ws.onclose = () => {
      console.log('Disconnected from server');
      this.reconnect();
    };

    this.ws.onerror = (error) => {
      console.error('WebSocket error:', error);
    };
  }

  reconnect() {
    if (this.reconnectAttempts < this.maxReconnectAttempts) {
      this.reconnectAttempts++;
      console.log(`Reconnecting... (${this.reconnectAttempts}/${this.maxReconnectAttempts})`);
      setTimeout(() => this.connect(), this.reconnectInterval);
    }
  }

  on(type, handler) {
    this.messageHandlers.set(type, handler);
  }

  emit(type, payload) {
    this.send({ type, ...payload });
  }

  send(data) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(data));
    } else {
      console.error('WebSocket is not connected');
    }
  }
}

// Usage
const client = new WebSocketClient('ws://localhost:8080');
client.connect();

client.on('chat', (message) => {
  console.log(`${message.user}: ${message.text}`);
});
