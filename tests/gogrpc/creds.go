package main

// TLS and per-call credentials as inctl sends them (auth.NewCloudConnection):
// ACC_CA names the CA to trust; ACC_TOKEN is a JWT sent as
// `authorization: Bearer`, or, with ACC_COOKIE=1, as inctl's
// `cookie: auth-proxy=<JWT>; org-id=<org>` with `x-intrinsic-org`.

import (
	"context"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

type tokenCreds struct {
	token  string
	cookie bool
}

func (t tokenCreds) GetRequestMetadata(ctx context.Context, uri ...string) (map[string]string, error) {
	if t.cookie {
		return map[string]string{"cookie": "auth-proxy=" + t.token + "; org-id=acme", "x-intrinsic-org": "acme"}, nil
	}
	return map[string]string{"authorization": "Bearer " + t.token}, nil
}

func (t tokenCreds) RequireTransportSecurity() bool { return true }

// dialOptions: plaintext, or TLS (+ token) from the environment.
func dialOptions(withToken bool) []grpc.DialOption {
	ca := os.Getenv("ACC_CA")
	if ca == "" {
		return []grpc.DialOption{grpc.WithInsecure()}
	}
	tc, err := credentials.NewClientTLSFromFile(ca, "localhost")
	if err != nil {
		panic(err)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(tc)}
	if tok := os.Getenv("ACC_TOKEN"); tok != "" && withToken {
		opts = append(opts, grpc.WithPerRPCCredentials(tokenCreds{tok, os.Getenv("ACC_COOKIE") == "1"}))
	}
	return opts
}
