//go:build tools

// Package tools lists the main packages scripts/build-e2e.sh builds besides the test binary
// (suite/), so that `go mod tidy` keeps every module they need in go.mod and go.sum. It is never
// compiled.
package tools

import (
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
