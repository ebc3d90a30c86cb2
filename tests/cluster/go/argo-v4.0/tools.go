//go:build tools

// The main packages this module builds; the blank imports keep `go mod tidy` from
// dropping their dependencies.
package tools

import (
	_ "github.com/argoproj/argo-workflows/v4/cmd/argoexec"
	_ "github.com/argoproj/argo-workflows/v4/cmd/workflow-controller"
)
