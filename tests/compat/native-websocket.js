// TUTORIAL CODE, kept as the classic WebSocket tutorial writes it (browser or Node with a
// global WebSocket): the native WebSocket with addEventListener, sending a plain string and
// JSON like {type: 'chat', text}. Written for a plain Node `ws` server on ws://localhost:8080.
// clients/js/test/compat.test.js runs it against pushsvc unchanged except for that URL
// (pushsvc's /ws with ?access_token=JWT). Do not "fix" it: it stands for code in the wild.

// Create WebSocket connection.
const socket = new WebSocket('ws://localhost:8080');

// Connection opened
socket.addEventListener('open', (event) => {
  console.log('Connected to WebSocket server');
  socket.send('Hello Server!');
});

// Listen for messages
socket.addEventListener('message', (event) => {
  console.log('Message from server:', event.data);
});

// Connection closed
socket.addEventListener('close', (event) => {
  console.log('Disconnected from WebSocket server');
});

// Handle errors
socket.addEventListener('error', (error) => {
  console.error('WebSocket error:', error);
});

// Send a chat message as JSON
function sendMessage(text) {
  if (socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: 'chat', text: text }));
  }
}
