// node's own HTTP server (llhttp, strict: no --insecure-http-parser): 200 to every
// request it reads whole, its own 400 to what its parser refuses. The differential
// corpus's node backend (tests/test_http_corpus.py). node strict.js PORT
const http = require("http");
const server = http.createServer((req, res) => {
  req.on("data", () => {});
  req.on("end", () => {
    res.writeHead(200, { "Content-Length": "3", Connection: "close" });
    res.end("ok\n");
  });
});
server.listen(Number(process.argv[2]), "127.0.0.1");
