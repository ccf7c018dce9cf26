"""A stand-in HTTP mail API on loopback, for the "Writing a mailer" example.

    python httpapisink.py RECORD [--status N] [--refuse ADDRESS=CODE TEXT]...

Prints its port, then answers POSTs as tests/mailout_httpapi expects: 200
and ``{"refused": {...}}`` (the --refuse ones), or --status; each POSTed
JSON body is appended to RECORD, one a line.  HEAD answers 204.
"""
import argparse
import http.server
import json
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('record')
    parser.add_argument('--status', type=int, default=200)
    parser.add_argument('--refuse', action='append', default=[])
    args = parser.parse_args()
    refused = {}
    for item in args.refuse:
        address, reply = item.split('=', 1)
        code, text = reply.split(' ', 1)
        refused[address] = [int(code), text]

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = 'mailapi/1.0'

        def do_HEAD(self):
            self.send_response(204)
            self.end_headers()

        def do_POST(self):
            body = self.rfile.read(int(self.headers['Content-Length']))
            with open(args.record, 'a') as f:
                f.write(json.dumps({'path': self.path,
                                    **json.loads(body)}) + '\n')
            answer = json.dumps({'refused': refused}).encode() \
                if args.status == 200 else b'over quota'
            self.send_response(args.status)
            self.send_header('Content-Length', str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == '__main__':
    main()
