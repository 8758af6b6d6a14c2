{{/* Names and labels. */}}
{{- define "lmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lmserve.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Seconds the kubelet waits after the preStop hook starts before SIGKILL. */}}
{{- define "lmserve.gracePeriod" -}}
{{- $d := .Values.drain }}
{{- if kindIs "invalid" $d.terminationGracePeriodSeconds }}
{{- add $d.preStopSleepSeconds (mul 2 $d.timeoutSeconds) 10 }}
{{- else }}
{{- if le (int $d.terminationGracePeriodSeconds) (int (add $d.preStopSleepSeconds $d.timeoutSeconds)) }}
{{- fail (printf "drain.terminationGracePeriodSeconds (%v) must exceed drain.preStopSleepSeconds + drain.timeoutSeconds (%v)" $d.terminationGracePeriodSeconds (add $d.preStopSleepSeconds $d.timeoutSeconds)) }}
{{- end }}
{{- $d.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* torch threads: server.numThreads, else the CPU limit rounded down (at least 1), else unset; unset
     with engine vllm too (vLLM decides its threads; the server refuses --num-threads with it). */}}
{{- define "lmserve.numThreads" -}}
{{- if eq .Values.engine "vllm" }}
{{- else if not (kindIs "invalid" .Values.server.numThreads) }}
{{- .Values.server.numThreads }}
{{- else }}
{{- $cpu := dig "limits" "cpu" "" .Values.resources | toString }}
{{- if hasSuffix "m" $cpu }}
{{- max 1 (div (trimSuffix "m" $cpu | int) 1000) }}
{{- else if $cpu }}
{{- max 1 (floor $cpu | int) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lmserve.inferencePoolName" -}}
{{- .Values.inferencePool.name | default (include "lmserve.fullname" .) }}
{{- end }}

{{- define "lmserve.eppName" -}}
{{- printf "%s-epp" (include "lmserve.inferencePoolName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmserve.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "lmserve.name" . }}-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Cross-field checks that values.schema.json cannot express. */}}
{{- define "lmserve.validate" -}}
{{- if and (ne .Values.engine "vllm") (or .Values.vllm.tensorParallelSize .Values.vllm.pipelineParallelSize .Values.vllm.gpuMemoryUtilization .Values.vllm.distributedExecutorBackend) }}
{{- fail "vllm.* settings need engine: vllm" }}
{{- end }}
{{- if and (eq .Values.engine "vllm") (not (kindIs "invalid" .Values.server.numThreads)) }}
{{- fail "server.numThreads is not used with engine: vllm (vLLM decides its threads)" }}
{{- end }}
{{- if and (eq .Values.engine "vllm") (ne .Values.server.quantization "none") }}
{{- fail "server.quantization is not used with engine: vllm (it is the native engine's C kernels)" }}
{{- end }}
{{- if and (eq .Values.engine "vllm") (ne .Values.server.kernelVariant "auto") }}
{{- fail "server.kernelVariant is not used with engine: vllm (it chooses the native engine's C kernels)" }}
{{- end }}
{{- if and .Values.safety.disabled .Values.safety.policy }}
{{- fail "safety.disabled and safety.policy exclude each other" }}
{{- end }}
{{- if and (eq .Values.probes.protocol "grpc") (eq (int .Values.ports.grpc) 0) }}
{{- fail "probes.protocol grpc needs a gRPC port (ports.grpc is 0)" }}
{{- end }}
{{- if and .Values.grpcTls.existingSecret (eq .Values.probes.protocol "grpc") }}
{{- fail "probes.protocol grpc cannot check a TLS gRPC port (the kubelet's gRPC probe has no TLS): use probes.protocol http with grpcTls" }}
{{- end }}
{{- if and .Values.grpcTls.existingSecret (eq (int .Values.ports.grpc) 0) }}
{{- fail "grpcTls.existingSecret needs a gRPC port (ports.grpc is 0)" }}
{{- end }}
{{- if and .Values.grpcTls.requireClientCert (not .Values.grpcTls.existingSecret) }}
{{- fail "grpcTls.requireClientCert needs grpcTls.existingSecret (its ca.crt)" }}
{{- end }}
{{- if and .Values.inferencePool.enabled (not .Values.metrics.open) }}
{{- fail "inferencePool.enabled needs metrics.open=true: the endpoint picker scrapes /metrics without an API key" }}
{{- end }}
{{- if and .Values.inferencePool.enabled (not .Values.inferencePool.endpointPicker.create) (not .Values.inferencePool.endpointPicker.serviceName) }}
{{- fail "inferencePool.endpointPicker.serviceName is required when inferencePool.endpointPicker.create is false" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.open) (not .Values.serviceMonitor.authorization.secretName) }}
{{- fail "serviceMonitor needs metrics.open=true or serviceMonitor.authorization.secretName (a Secret holding one API key)" }}
{{- end }}
{{- if and .Values.serviceMonitor.authorization.secretName (not .Values.serviceMonitor.authorization.secretKey) }}
{{- fail "serviceMonitor.authorization.secretKey is required with serviceMonitor.authorization.secretName" }}
{{- end }}
{{- if and (eq .Values.cache.type "existingClaim") (not .Values.cache.existingClaim) }}
{{- fail "cache.existingClaim is required when cache.type is existingClaim" }}
{{- end }}
{{- if and .Values.modelVolume.enabled (not .Values.modelVolume.existingClaim) }}
{{- fail "modelVolume.existingClaim is required when modelVolume.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.queueDepth.enabled) }}
{{- fail "autoscaling needs a metric: autoscaling.targetCPUUtilizationPercentage or autoscaling.queueDepth.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity as a number of its base unit (cores, bytes, GPUs), printed as a float64, for
     comparisons: "1.5", "1500m", "2" or 2, "512Mi", "3Gi", "3G", "3072M", "1e9" (1e+09 as YAML's float
     prints), "100k", ".5", "+1". Helm has no quantity type: a regex splits the number from its suffix
     (Kubernetes' grammar: a decimal suffix n u m k M G T P E, a binary one Ki..Ei, or an exponent e/E<n>)
     and mulf scales it; sprig computes mulf in decimal, so "1500m" and "1.5", or "1Gi" and
     "1073741824", give the same float. .value: the quantity; .name: its values key, for the error. */}}
{{- define "lmserve.quantity" -}}
{{- $q := toString .value }}
{{- $re := "^([+-]?(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+))([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$" }}
{{- if not (regexMatch $re $q) }}
{{- fail (printf "%s (%s) is not a Kubernetes quantity (e.g. 1.5, 1500m, 512Mi, 3Gi, 1e9)" .name $q) }}
{{- end }}
{{- $suffix := regexReplaceAll $re $q "${2}" }}
{{- $factors := dict "" "1" "n" "1e-9" "u" "1e-6" "m" "1e-3" "k" "1e3" "M" "1e6" "G" "1e9" "T" "1e12" "P" "1e15" "E" "1e18" "Ki" "1024" "Mi" "1048576" "Gi" "1073741824" "Ti" "1099511627776" "Pi" "1125899906842624" "Ei" "1152921504606846976" }}
{{- /* an exponent suffix "e3" / "E-2" is its own factor: "1e3" */}}
{{- $factor := ternary (get $factors $suffix) (printf "1%s" $suffix) (hasKey $factors $suffix) }}
{{- mulf (float64 (regexReplaceAll $re $q "${1}")) (float64 $factor) }}
{{- end }}

{{/* Kubernetes refuses a container whose limit is below its request, and for a resource it cannot
     overcommit (an extended resource such as nvidia.com/gpu, or hugepages-*) any limit but the request;
     values.schema.json cannot compare two values, so the chart fails first (helm template and install
     refuse; helm lint only logs a template's fail, as "[INFO] Fail: ...").
     Every resource named in both requests and limits is compared. .resources: the container's resources
     as rendered; .path: their values key (resources, inferencePool.endpointPicker.resources). */}}
{{- define "lmserve.checkResources" -}}
{{- $path := .path }}
{{- $requests := get (.resources | default dict) "requests" | default dict }}
{{- $limits := get (.resources | default dict) "limits" | default dict }}
{{- range $name, $limit := $limits }}
{{- $request := get $requests $name }}
{{- if and (hasKey $requests $name) (not (kindIs "invalid" $limit)) (not (kindIs "invalid" $request)) }}
{{- $key := replace "." "\\." $name }}{{- /* --set's escape for the dots of nvidia.com/gpu */}}
{{- $limitKey := printf "%s.limits.%s" $path $key }}
{{- $requestKey := printf "%s.requests.%s" $path $key }}
{{- $l := include "lmserve.quantity" (dict "value" $limit "name" $limitKey) | float64 }}
{{- $r := include "lmserve.quantity" (dict "value" $request "name" $requestKey) | float64 }}
{{- $hint := printf "--set %s=%v --set %s=%v" $requestKey (toString $limit) $limitKey (toString $limit) }}
{{- if lt $l $r }}
{{- fail (printf "%s (%v) is below %s (%v): set both together, e.g. %s" $limitKey (toString $limit) $requestKey (toString $request) $hint) }}
{{- end }}
{{- $native := or (not (contains "/" $name)) (contains "kubernetes.io/" $name) }}
{{- if and (ne $l $r) (or (not $native) (hasPrefix "hugepages-" $name)) }}
{{- fail (printf "%s (%v) differs from %s (%v): Kubernetes needs %s requested and limited alike, e.g. %s" $limitKey (toString $limit) $requestKey (toString $request) $name $hint) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
